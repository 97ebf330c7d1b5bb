import type { Readable } from "node:stream";

/** Bytes [start, end) of an object; `end` is exclusive. */
export interface ByteRange {
  start: number;
  end: number;
}

/**
 * Where checkpoint bytes live. Keys are `/`-separated relative paths without `.` or `..` segments.
 * Two implementations: S3 (production) and the filesystem (embedded); one contract test suite
 * runs against both.
 */
/** Where a store is: enough for another process to open the same store (`openStore`). */
export type StoreLocation = { kind: "filesystem"; root: string } | { kind: "s3"; options: S3StoreOptions };

/** The S3 store's settings. */
export interface S3StoreOptions {
  bucket: string;
  region: string;
  endpoint?: string | undefined;
  forcePathStyle?: boolean | undefined;
  credentials?: { accessKeyId: string; secretAccessKey: string } | undefined;
  /** Multipart part size for streamed uploads (S3 minimum: 5 MiB; default 8 MiB). */
  partSizeBytes?: number;
}

export interface ObjectStore {
  readonly kind: "filesystem" | "s3";
  readonly location: StoreLocation;
  /**
   * Stores the stream under `key`, atomically: afterwards either the whole object exists or
   * nothing does. If `body` errors, the returned promise rejects with that error and nothing is
   * left behind (no temp file, no incomplete multipart upload).
   */
  put(key: string, body: Readable): Promise<{ sizeBytes: number }>;
  /**
   * Starts writing `key` from buffers (what `put` does with a stream's chunks): nothing is
   * visible until `commit`, and `abort` leaves nothing behind.
   */
  create(key: string): Promise<ObjectWriter>;
  /** Streams the object, or a byte range of it. Rejects with `ObjectNotFoundError`. */
  get(key: string, range?: ByteRange): Promise<Readable>;
  /**
   * Fills `target` with the object's bytes from `offset`, without a stream in between; rejects
   * with `ObjectNotFoundError`, or when the object ends first.
   */
  read(key: string, offset: number, target: Uint8Array): Promise<void>;
  /** The object's size, or null when it does not exist. */
  stat(key: string): Promise<{ sizeBytes: number } | null>;
  /** Removes the object; removing a missing object is not an error. */
  delete(key: string): Promise<void>;
  /** Every key under a prefix, sorted. */
  list(prefix: string): Promise<string[]>;
  /** A time-limited URL a client can GET directly, or null when the store cannot make one. */
  presignGet(key: string, options: { expiresInSeconds: number; fileName: string }): Promise<string | null>;
  /** Throws when the store cannot be reached. */
  ping(): Promise<void>;
  /**
   * Removes what writers that died mid-write left behind: writes untouched for
   * `olderThanSeconds` (a live writer touches its write at least every 5 minutes); returns how
   * many. The filesystem store removes its temp files; S3 aborts the multipart uploads of `put`s
   * whose marker went stale.
   */
  sweepIncomplete(olderThanSeconds: number): Promise<number>;
  /** Present when clients can upload parts directly (S3). */
  readonly multipart?: MultipartUploads;
}

/** An object being written, in order: `write`s, then `commit` or `abort`. */
export interface ObjectWriter {
  /** Appends `data`, which may be reused once the promise resolves. */
  write(data: Uint8Array): Promise<void>;
  /** Makes the whole object visible under its key. */
  commit(): Promise<{ sizeBytes: number }>;
  /** Drops what was written; safe after a failed `write` or `commit`. */
  abort(): Promise<void>;
}

/** `put` for any store: the stream's chunks through `create`'s writer. */
export async function putStream(
  store: ObjectStore,
  key: string,
  body: Readable,
): Promise<{ sizeBytes: number }> {
  const writer = await store.create(key);
  try {
    for await (const chunk of body) {
      await writer.write(typeof chunk === "string" ? Buffer.from(chunk) : (chunk as Uint8Array));
    }
    return await writer.commit();
  } catch (err) {
    body.destroy();
    await writer.abort();
    throw err;
  }
}

/**
 * Multipart uploads that clients send straight to the store through presigned part URLs (S3
 * only: API Gateway and Lambda cap request bodies). Parts are numbered from 1.
 */
export interface MultipartUploads {
  create(key: string): Promise<string>;
  presignPart(key: string, uploadId: string, partNumber: number, expiresInSeconds: number): Promise<string>;
  complete(key: string, uploadId: string, parts: { partNumber: number; etag: string }[]): Promise<void>;
  abort(key: string, uploadId: string): Promise<void>;
}

export class ObjectNotFoundError extends Error {
  constructor(readonly key: string) {
    super(`object ${key} not found`);
    this.name = "ObjectNotFoundError";
  }
}

const SEGMENT = /^[A-Za-z0-9_][A-Za-z0-9._=-]*$/;

/** Throws unless `key` is a safe relative path (no traversal, no absolute paths). */
export function assertValidKey(key: string): void {
  const segments = key.split("/");
  if (key.length > 512 || segments.some((s) => !SEGMENT.test(s))) {
    throw new Error(`invalid object key ${JSON.stringify(key)}`);
  }
}

/**
 * A `Content-Disposition: attachment` value for any file name (RFC 6266): `filename*` carries
 * the name in UTF-8, percent-encoded; `filename` an ASCII stand-in for clients that predate it.
 * Header values are Latin-1, so a raw name with other characters cannot be sent as is.
 */
export function attachmentDisposition(fileName: string): string {
  const ascii = fileName.replace(/[^\x20-\x7e]|["\\]/g, "_");
  // RFC 8187's attr-char stays; every other byte of the UTF-8 encoding is percent-encoded.
  const encoded = [...Buffer.from(fileName, "utf8")]
    .map((b) =>
      /[A-Za-z0-9!#$&+\-.^_`|~]/.test(String.fromCharCode(b))
        ? String.fromCharCode(b)
        : `%${b.toString(16).toUpperCase().padStart(2, "0")}`,
    )
    .join("");
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encoded}`;
}
