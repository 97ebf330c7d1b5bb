import { createHash, type Hash } from "node:crypto";
import { Transform, type TransformCallback } from "node:stream";
import { ThreadService } from "../threads.js";
import { DTYPE_BITS, type Dtype, isDtype } from "./dtypes.js";
import { type Json, JsonSyntaxError, parseStrictJson } from "./strict-json.js";

/** Default cap on the JSON header; the reference parser allows 100 MB, we allow less. */
export const DEFAULT_MAX_HEADER_BYTES = 25_000_000;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

export type SafetensorsProblem =
  | "truncated"
  | "header_too_large"
  | "invalid_header"
  | "invalid_tensor"
  | "invalid_offsets"
  | "length_mismatch"
  | "too_large";

/** A file that is not valid safetensors, with the first problem found. */
export class SafetensorsError extends Error {
  constructor(
    readonly problem: SafetensorsProblem,
    message: string,
  ) {
    super(message);
    this.name = "SafetensorsError";
  }
}

export interface TensorEntry {
  name: string;
  dtype: Dtype;
  shape: number[];
  /** Byte offsets relative to the start of the data section, end exclusive. */
  begin: number;
  end: number;
}

export interface SafetensorsHeader {
  /** Tensors in file order (sorted by offset). */
  tensors: TensorEntry[];
  metadata: Record<string, string> | null;
  /** Bytes before the data section: 8 + header length. */
  dataStart: number;
  /** Bytes in the data section. */
  dataBytes: number;
}

/**
 * Parses and checks a safetensors JSON header with every check of the reference parser
 * (UTF-8, starts with '{', `__metadata__` a string map, known dtypes, offsets contiguous from 0,
 * byte size = elements x dtype size, no arithmetic overflow) and more: duplicate keys, unknown
 * entry fields and integers beyond 2^53 are rejected. The file length is checked by the caller.
 */
export function parseSafetensorsHeader(headerBytes: Uint8Array): SafetensorsHeader {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(headerBytes);
  } catch {
    throw new SafetensorsError("invalid_header", "header is not valid UTF-8");
  }
  if (!text.startsWith("{")) throw new SafetensorsError("invalid_header", "header does not start with '{'");
  let root: Json;
  try {
    root = parseStrictJson(text, 8);
  } catch (err) {
    if (err instanceof JsonSyntaxError) {
      throw new SafetensorsError("invalid_header", `header is not valid JSON: ${err.message}`);
    }
    throw err;
  }
  if (!(root instanceof Map)) throw new SafetensorsError("invalid_header", "header is not a JSON object");

  let metadata: Record<string, string> | null = null;
  const tensors: TensorEntry[] = [];
  for (const [name, entry] of root) {
    if (name === "__metadata__") {
      metadata = parseMetadata(entry);
    } else {
      tensors.push(parseEntry(name, entry));
    }
  }

  tensors.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let offset = 0;
  for (const t of tensors) {
    if (t.begin !== offset || t.end < t.begin) {
      throw new SafetensorsError(
        "invalid_offsets",
        `tensor ${JSON.stringify(t.name)} has data_offsets [${t.begin}, ${t.end}] but the previous tensor ends at ${offset}: offsets must be contiguous from 0, without gaps or overlaps`,
      );
    }
    offset = t.end;
  }
  return { tensors, metadata, dataStart: 8 + headerBytes.length, dataBytes: offset };
}

function parseMetadata(entry: Json): Record<string, string> {
  if (!(entry instanceof Map)) throw new SafetensorsError("invalid_header", "__metadata__ must be an object");
  for (const [key, value] of entry) {
    if (typeof value !== "string") {
      throw new SafetensorsError("invalid_header", `__metadata__.${key} must be a string`);
    }
    // Postgres text cannot hold U+0000, and metadata is stored with the checkpoint.
    if (key.includes("\u0000") || value.includes("\u0000")) {
      throw new SafetensorsError(
        "invalid_header",
        `__metadata__.${JSON.stringify(key)} holds a NUL character (U+0000), which is not allowed in metadata`,
      );
    }
  }
  // fromEntries defines own properties, so a "__proto__" key stays plain data.
  return Object.fromEntries(entry) as Record<string, string>;
}

function parseEntry(name: string, entry: Json): TensorEntry {
  const where = `tensor ${JSON.stringify(name)}`;
  const bad = (message: string) => new SafetensorsError("invalid_tensor", `${where}: ${message}`);
  if (!(entry instanceof Map)) throw bad("entry must be an object");
  for (const key of entry.keys()) {
    if (key !== "dtype" && key !== "shape" && key !== "data_offsets")
      throw bad(`unknown field ${JSON.stringify(key)}`);
  }
  const dtype = entry.get("dtype");
  const shape = entry.get("shape");
  const offsets = entry.get("data_offsets");
  if (typeof dtype !== "string") throw bad("dtype must be a string");
  if (!isDtype(dtype)) throw bad(`unknown dtype ${JSON.stringify(dtype)}`);
  if (!Array.isArray(shape)) throw bad("shape must be an array of non-negative integers");
  if (!Array.isArray(offsets) || offsets.length !== 2) throw bad("data_offsets must be [begin, end]");

  const dims = shape.map((d) => safeInteger(d, "shape", bad));
  const [begin, end] = offsets.map((o) => safeInteger(o, "data_offsets", bad)) as [number, number];

  let bits = BigInt(DTYPE_BITS[dtype]);
  for (const d of dims) {
    bits *= BigInt(d);
    if (bits > MAX_SAFE * 8n) throw bad("shape x dtype size overflows 2^53 bytes");
  }
  if (bits % 8n !== 0n) throw bad(`${dims.join("x")} elements of ${dtype} do not fill whole bytes`);
  const bytes = Number(bits / 8n);
  if (end >= begin && end - begin !== bytes) {
    throw bad(
      `data_offsets cover ${end - begin} bytes but shape [${dims.join(", ")}] of ${dtype} needs ${bytes}`,
    );
  }
  return { name, dtype, shape: dims, begin, end };
}

function safeInteger(value: Json | undefined, field: string, bad: (m: string) => SafetensorsError): number {
  if (typeof value !== "bigint" || value < 0n) throw bad(`${field} must hold non-negative integers`);
  if (value > MAX_SAFE) throw bad(`${field} value ${value} is beyond 2^53`);
  return Number(value);
}

/**
 * The header length in the 8-byte little-endian prefix, checked against the cap and the
 * 2-byte minimum ("{}").
 */
export function headerLengthOf(prefix: Uint8Array, maxHeaderBytes: number): number {
  const length = Buffer.from(prefix.buffer, prefix.byteOffset, 8).readBigUInt64LE(0);
  if (length > BigInt(maxHeaderBytes)) {
    throw new SafetensorsError(
      "header_too_large",
      `header length ${length} exceeds the limit of ${maxHeaderBytes} bytes`,
    );
  }
  if (length < 2n) throw new SafetensorsError("invalid_header", `header length ${length} is too small`);
  return Number(length);
}

/** A tensor to lay out in a new file. */
export interface TensorLayout {
  name: string;
  dtype: Dtype;
  shape: number[];
}

/**
 * Encodes a header for tensors stored back to back in the given order, padded with spaces so
 * the data section starts 8-byte aligned. Returns the prefix+header bytes and the entries.
 */
export function encodeSafetensorsHeader(
  tensors: TensorLayout[],
  metadata: Record<string, string> | null,
): { bytes: Buffer; header: SafetensorsHeader } {
  const json: Record<string, unknown> = metadata ? { __metadata__: metadata } : {};
  const entries: TensorEntry[] = [];
  let offset = 0;
  for (const t of tensors) {
    const bytes = (t.shape.reduce((a, b) => a * b, 1) * DTYPE_BITS[t.dtype]) / 8;
    if (!Number.isInteger(bytes)) throw new Error(`tensor ${t.name} does not fill whole bytes`);
    entries.push({ ...t, begin: offset, end: offset + bytes });
    json[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let text = JSON.stringify(json);
  text += " ".repeat((8 - ((Buffer.byteLength(text) + 8) % 8)) % 8);
  const bytes = Buffer.alloc(8 + Buffer.byteLength(text));
  bytes.writeBigUInt64LE(BigInt(bytes.length - 8));
  bytes.write(text, 8, "utf8");
  return { bytes, header: { tensors: entries, metadata, dataStart: bytes.length, dataBytes: offset } };
}

/** What a checkpoint's record keeps of its header. */
export interface HeaderDigest {
  tensorCount: number;
  /** Elements across all tensors. */
  parameterCount: number;
  /** The distinct dtypes, sorted. */
  dtypes: Dtype[];
  metadata: Record<string, string> | null;
  dataStart: number;
  dataBytes: number;
}

export function digestHeader(header: SafetensorsHeader): HeaderDigest {
  const { tensors, metadata, dataStart, dataBytes } = header;
  return {
    tensorCount: tensors.length,
    parameterCount: tensors.reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0),
    dtypes: [...new Set(tensors.map((t) => t.dtype))].sort(),
    metadata,
    dataStart,
    dataBytes,
  };
}

/** What an upload pass learns about a valid file. */
export interface SafetensorsSummary extends HeaderDigest {
  sha256: string;
  sizeBytes: number;
}

/** Headers up to this size are parsed as they arrive; larger ones on a thread (`header-thread.ts`). */
const INLINE_HEADER_BYTES = 1024 * 1024;

type HeaderReply = { digest: HeaderDigest } | { error: { problem: SafetensorsProblem; message: string } };

/** The process's thread for large headers: parsing 25 MB of JSON takes about a second. */
const headerThread = new ThreadService<Uint8Array, HeaderReply>(import.meta.url, "header-thread");

/** Parses a header on the header thread; rejects as `parseSafetensorsHeader` would. */
async function digestOffThread(headerBytes: Buffer): Promise<HeaderDigest> {
  const reply = await headerThread.run(headerBytes);
  if ("error" in reply) throw new SafetensorsError(reply.error.problem, reply.error.message);
  return reply.digest;
}

export interface ValidatorOptions {
  maxHeaderBytes?: number;
  /** Whole-file cap; exceeding it fails with problem `too_large`. */
  maxBytes?: number;
}

/**
 * Validates safetensors bytes given in order and hashes them (sha256) in the same pass: `update`
 * throws a `SafetensorsError` as soon as the bytes cannot be valid, `finish` once they end.
 * Memory: the header (at most `maxHeaderBytes`). A header over 1 MiB is parsed on a worker
 * thread, so that the event loop is not held for it: `update` then returns a promise, to be
 * awaited before the next.
 */
export class SafetensorsCheck {
  private readonly maxHeaderBytes: number;
  private readonly maxBytes: number;
  private readonly hash: Hash = createHash("sha256");
  private prefix = Buffer.alloc(0);
  private headerBuffer: Buffer | null = null;
  private headerFilled = 0;
  private header: HeaderDigest | null = null;
  private dataSeen = 0;
  private total = 0;

  constructor(options: ValidatorOptions = {}) {
    this.maxHeaderBytes = options.maxHeaderBytes ?? DEFAULT_MAX_HEADER_BYTES;
    this.maxBytes = options.maxBytes ?? Number.MAX_SAFE_INTEGER;
  }

  /** Takes in the next bytes. */
  update(bytes: Uint8Array): Promise<void> | undefined {
    this.total += bytes.byteLength;
    if (this.total > this.maxBytes) {
      throw new SafetensorsError("too_large", `file is larger than the limit of ${this.maxBytes} bytes`);
    }
    const parsing = this.consume(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
    if (!parsing) {
      this.hash.update(bytes);
      return;
    }
    return parsing.then(() => {
      this.hash.update(bytes);
    });
  }

  /** The summary of the bytes taken in, which must be a whole file. */
  finish(): SafetensorsSummary {
    if (!this.header) {
      throw new SafetensorsError(
        "truncated",
        this.headerBuffer
          ? `file ends inside the ${this.headerBuffer.length}-byte header`
          : `file is ${this.total} bytes, shorter than the 8-byte header length`,
      );
    }
    if (this.dataSeen < this.header.dataBytes) {
      throw new SafetensorsError(
        "truncated",
        `file ends after ${this.dataSeen} of ${this.header.dataBytes} data bytes the header describes`,
      );
    }
    return { ...this.header, sha256: this.hash.digest("hex"), sizeBytes: this.total };
  }

  /** Takes in a chunk; a promise while a large header is parsed on the thread. */
  private consume(chunk: Buffer): Promise<void> | undefined {
    let rest = chunk;
    if (!this.headerBuffer) {
      const need = 8 - this.prefix.length;
      this.prefix = Buffer.concat([this.prefix, rest.subarray(0, need)]);
      rest = rest.subarray(need);
      if (this.prefix.length < 8) return;
      this.headerBuffer = Buffer.allocUnsafe(headerLengthOf(this.prefix, this.maxHeaderBytes));
    }
    if (!this.header) {
      const take = Math.min(rest.length, this.headerBuffer.length - this.headerFilled);
      rest.copy(this.headerBuffer, this.headerFilled, 0, take);
      this.headerFilled += take;
      rest = rest.subarray(take);
      if (this.headerFilled < this.headerBuffer.length) return;
      if (this.headerBuffer.length > INLINE_HEADER_BYTES) {
        const data = rest;
        return digestOffThread(this.headerBuffer).then((digest) => {
          this.header = digest;
          this.countData(data);
        });
      }
      this.header = digestHeader(parseSafetensorsHeader(this.headerBuffer));
    }
    this.countData(rest);
  }

  private countData(data: Buffer): void {
    const header = this.header as HeaderDigest;
    this.dataSeen += data.length;
    if (this.dataSeen > header.dataBytes) {
      throw new SafetensorsError(
        "length_mismatch",
        `file has more than the ${header.dataBytes} data bytes the header describes`,
      );
    }
  }
}

/**
 * A pass-through stream that validates and hashes safetensors bytes as they flow
 * (`SafetensorsCheck`). It errors as soon as the bytes cannot be valid (so a store consuming it
 * aborts early); `summary()` is available once the stream has ended. Memory: the header plus
 * one chunk.
 */
export class SafetensorsValidator extends Transform {
  private readonly check: SafetensorsCheck;
  private result: SafetensorsSummary | null = null;

  constructor(options: ValidatorOptions = {}) {
    super();
    this.check = new SafetensorsCheck(options);
  }

  /** The summary of a completely validated file; throws if the stream has not ended cleanly. */
  summary(): SafetensorsSummary {
    if (!this.result) throw new Error("safetensors stream has not been fully validated");
    return this.result;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    try {
      const parsing = this.check.update(chunk);
      if (parsing) parsing.then(() => callback(null, chunk), callback);
      else callback(null, chunk);
    } catch (err) {
      callback(err as Error);
    }
  }

  override _flush(callback: TransformCallback): void {
    try {
      this.result = this.check.finish();
      callback();
    } catch (err) {
      callback(err as Error);
    }
  }
}
