import { createHash, randomBytes } from "node:crypto";

/**
 * A UUIDv7 (RFC 9562): 48-bit millisecond timestamp, then random bits. Ids sort by creation
 * time, which keeps b-tree inserts local and makes `id` a usable pagination key.
 */
export function newId(now = Date.now()): string {
  const bytes = randomBytes(16);
  bytes.writeUIntBE(now, 0, 6);
  bytes[6] = 0x70 | ((bytes[6] ?? 0) & 0x0f);
  bytes[8] = 0x80 | ((bytes[8] ?? 0) & 0x3f);
  return formatUuid(bytes);
}

function formatUuid(bytes: Buffer): string {
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * A UUIDv7 derived from a parent UUIDv7 and a label: the parent's timestamp, then hash bits,
 * so the same inputs always give the same id and ids still sort by time. Job outputs use it:
 * a retried job writes to, and registers, the same ids.
 */
export function derivedId(parent: string, label: string): string {
  const bytes = createHash("sha256").update(`${parent}/${label}`).digest().subarray(0, 16);
  Buffer.from(parent.replaceAll("-", "").slice(0, 12), "hex").copy(bytes, 0);
  bytes[6] = 0x70 | ((bytes[6] ?? 0) & 0x0f);
  bytes[8] = 0x80 | ((bytes[8] ?? 0) & 0x3f);
  return formatUuid(bytes);
}
