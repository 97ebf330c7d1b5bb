import { RangeNotSatisfiableError } from "../services/errors.js";
import type { ByteRange } from "../storage/object-store.js";

/**
 * Resolves a `Range` header against a file size (RFC 9110 section 14). Returns null when the
 * whole file should be sent: no header, a header we do not serve (multiple ranges, other
 * units, bad syntax - servers may ignore those). Throws when a single range lies outside.
 */
export function resolveRange(header: string | undefined, size: number): ByteRange | null {
  const match = header?.trim().match(/^bytes=(\d*)-(\d*)$/);
  if (!match) return null;
  const [, first = "", last = ""] = match;
  if (first === "" && last === "") return null;
  let range: ByteRange;
  if (first === "") {
    const suffix = Number(last);
    range = suffix === 0 ? { start: size, end: size } : { start: Math.max(0, size - suffix), end: size };
  } else {
    const start = Number(first);
    const end = last === "" ? size : Math.min(Number(last) + 1, size);
    if (last !== "" && Number(last) < start) return null;
    range = { start, end };
  }
  if (range.start >= size || range.end <= range.start) {
    throw new RangeNotSatisfiableError(`range ${header} is outside the ${size}-byte file`, size);
  }
  return range;
}
