import { createHash } from "node:crypto";
import { Readable } from "node:stream";
import { text } from "node:stream/consumers";
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  NoSuchKey,
  NotFound,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
  UploadPartCommand,
} from "@aws-sdk/client-s3";
import { getSignedUrl } from "@aws-sdk/s3-request-presigner";
import {
  assertValidKey,
  attachmentDisposition,
  type ByteRange,
  type MultipartUploads,
  ObjectNotFoundError,
  type ObjectStore,
  type ObjectWriter,
  putStream,
  type S3StoreOptions,
  type StoreLocation,
} from "./object-store.js";

const OCTETS = "application/octet-stream";
/** Where markers of open multipart uploads live (a prefix no checkpoint key starts with). */
const MARKERS = "_writes/";
const MARKER_REFRESH_MS = 5 * 60 * 1000;
const PARTS_IN_FLIGHT = 4;

/**
 * Object store on S3 or an S3-compatible server. Streams of unknown length go up as multipart
 * uploads (8 MiB parts, 4 in flight); a failed stream aborts the multipart upload, so no
 * partial object or orphan parts remain, and a writer that dies is swept (`sweepIncomplete`).
 */
export class S3Store implements ObjectStore {
  readonly kind = "s3" as const;
  readonly location: StoreLocation;
  private readonly client: S3Client;
  private readonly bucket: string;
  private readonly partSize: number;

  constructor(options: S3StoreOptions) {
    this.location = { kind: "s3", options };
    const config: S3ClientConfig = {
      region: options.region,
      forcePathStyle: options.forcePathStyle ?? false,
      // The SDK would checksum (CRC32) every part it sends and every object it reads, a pass over
      // the bytes on the event loop: objects are hashed (sha256) and validated where they are
      // written and read, and HTTP checks their length.
      requestChecksumCalculation: "WHEN_REQUIRED",
      responseChecksumValidation: "WHEN_REQUIRED",
    };
    if (options.endpoint) config.endpoint = options.endpoint;
    if (options.credentials) config.credentials = options.credentials;
    this.client = new S3Client(config);
    this.bucket = options.bucket;
    this.partSize = options.partSizeBytes ?? 8 * 1024 * 1024;
  }

  put(key: string, body: Readable): Promise<{ sizeBytes: number }> {
    return putStream(this, key, body);
  }

  /**
   * Writes an object in parts of `partSize` bytes: one PutObject at `commit` when it fits one
   * part, else a multipart upload with up to four parts in flight. While a multipart upload is
   * open, a marker object under `_writes/` names it, rewritten every few minutes; a writer that
   * dies leaves a marker that stops being rewritten, by which `sweepIncomplete` finds and aborts
   * the upload.
   */
  async create(key: string): Promise<ObjectWriter> {
    assertValidKey(key);
    let upload: { id: string; marker: string; refresh: NodeJS.Timeout } | null = null;
    const parts: { PartNumber: number; ETag: string }[] = [];
    const inFlight = new Set<Promise<void>>();
    let failure: unknown = null;
    // Part buffers are reused once their part is sent: at most one more than the parts in flight.
    const free: Buffer[] = [];
    let part: Buffer = Buffer.allocUnsafe(this.partSize);
    let filled = 0;
    let size = 0;
    const send = async (data: Buffer): Promise<void> => {
      upload ??= await this.startMultipart(key);
      const { id } = upload;
      const partNumber = parts.length + inFlight.size + 1;
      const sent: Promise<void> = this.client
        .send(
          new UploadPartCommand({
            Bucket: this.bucket,
            Key: key,
            UploadId: id,
            PartNumber: partNumber,
            Body: data,
          }),
        )
        .then((out) => {
          if (!out.ETag) throw new Error(`S3 returned no ETag for part ${partNumber}`);
          parts.push({ PartNumber: partNumber, ETag: out.ETag });
          if (data.byteLength === this.partSize) free.push(data);
        })
        .catch((err: unknown) => {
          failure ??= err;
        })
        .finally(() => inFlight.delete(sent));
      inFlight.add(sent);
      while (inFlight.size >= PARTS_IN_FLIGHT) await Promise.race(inFlight);
      if (failure) throw failure;
    };
    const finish = async () => {
      if (upload) {
        clearInterval(upload.refresh);
        await this.delete(upload.marker).catch(() => undefined);
      }
    };
    return {
      write: async (data) => {
        let rest = data;
        while (rest.byteLength > 0) {
          const take = Math.min(rest.byteLength, this.partSize - filled);
          part.set(rest.subarray(0, take), filled);
          filled += take;
          size += take;
          rest = rest.subarray(take);
          if (filled === this.partSize) {
            const full = part;
            part = free.pop() ?? Buffer.allocUnsafe(this.partSize);
            filled = 0;
            await send(full);
          }
        }
      },
      commit: async () => {
        const last = part.subarray(0, filled);
        if (size === filled) {
          await this.client.send(
            new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: last, ContentType: OCTETS }),
          );
          return { sizeBytes: size };
        }
        // A multipart upload's last part may be shorter than the others, not empty.
        if (filled > 0) await send(last);
        await Promise.all(inFlight);
        if (failure) throw failure;
        parts.sort((a, b) => a.PartNumber - b.PartNumber);
        await this.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: this.bucket,
            Key: key,
            UploadId: (upload as { id: string }).id,
            MultipartUpload: { Parts: parts },
          }),
        );
        await finish();
        return { sizeBytes: size };
      },
      abort: async () => {
        await Promise.allSettled(inFlight);
        if (upload) {
          await this.client
            .send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId: upload.id }))
            .catch(() => undefined);
        }
        await finish();
      },
    };
  }

  /** Opens a multipart upload and its marker, kept fresh while this process lives. */
  private async startMultipart(
    key: string,
  ): Promise<{ id: string; marker: string; refresh: NodeJS.Timeout }> {
    const out = await this.client.send(
      new CreateMultipartUploadCommand({ Bucket: this.bucket, Key: key, ContentType: OCTETS }),
    );
    if (!out.UploadId) throw new Error("S3 returned no UploadId");
    const id = out.UploadId;
    const marker = `${MARKERS}${createHash("sha256").update(id).digest("hex")}`;
    const write = () =>
      this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: marker,
          Body: JSON.stringify({ key, uploadId: id }),
        }),
      );
    await write();
    const refresh = setInterval(() => void write().catch(() => undefined), MARKER_REFRESH_MS);
    refresh.unref();
    return { id, marker, refresh };
  }

  async get(key: string, range?: ByteRange): Promise<Readable> {
    assertValidKey(key);
    if (range && range.end <= range.start) return Readable.from([]);
    try {
      const out = await this.client.send(
        new GetObjectCommand({
          Bucket: this.bucket,
          Key: key,
          ...(range ? { Range: `bytes=${range.start}-${range.end - 1}` } : {}),
        }),
      );
      if (!(out.Body instanceof Readable)) throw new Error("S3 GetObject returned no stream body");
      return out.Body;
    } catch (err) {
      if (err instanceof NoSuchKey) throw new ObjectNotFoundError(key);
      throw err;
    }
  }

  async read(key: string, offset: number, target: Uint8Array): Promise<void> {
    let filled = 0;
    for await (const chunk of await this.get(key, { start: offset, end: offset + target.byteLength })) {
      const bytes = chunk as Uint8Array;
      target.set(bytes.subarray(0, target.byteLength - filled), filled);
      filled += bytes.byteLength;
    }
    if (filled < target.byteLength)
      throw new Error(`object ${key} ends before byte ${offset + target.byteLength}`);
  }

  async stat(key: string): Promise<{ sizeBytes: number } | null> {
    assertValidKey(key);
    try {
      const out = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key }));
      return { sizeBytes: out.ContentLength ?? 0 };
    } catch (err) {
      if (err instanceof NotFound || err instanceof NoSuchKey) return null;
      throw err;
    }
  }

  async delete(key: string): Promise<void> {
    assertValidKey(key);
    await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
  }

  async list(prefix: string): Promise<string[]> {
    const keys: string[] = [];
    let token: string | undefined;
    do {
      const page = await this.client.send(
        new ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, ContinuationToken: token }),
      );
      for (const object of page.Contents ?? []) if (object.Key) keys.push(object.Key);
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
    return keys.sort();
  }

  async presignGet(key: string, options: { expiresInSeconds: number; fileName: string }): Promise<string> {
    assertValidKey(key);
    const command = new GetObjectCommand({
      Bucket: this.bucket,
      Key: key,
      ResponseContentDisposition: attachmentDisposition(options.fileName),
    });
    return getSignedUrl(this.client, command, { expiresIn: options.expiresInSeconds });
  }

  readonly multipart: MultipartUploads = {
    create: async (key) => {
      assertValidKey(key);
      const out = await this.client.send(
        new CreateMultipartUploadCommand({
          Bucket: this.bucket,
          Key: key,
          ContentType: "application/octet-stream",
        }),
      );
      if (!out.UploadId) throw new Error("S3 returned no UploadId");
      return out.UploadId;
    },
    presignPart: (key, uploadId, partNumber, expiresInSeconds) =>
      getSignedUrl(
        this.client,
        new UploadPartCommand({ Bucket: this.bucket, Key: key, UploadId: uploadId, PartNumber: partNumber }),
        { expiresIn: expiresInSeconds },
      ),
    complete: async (key, uploadId, parts) => {
      await this.client.send(
        new CompleteMultipartUploadCommand({
          Bucket: this.bucket,
          Key: key,
          UploadId: uploadId,
          MultipartUpload: { Parts: parts.map((p) => ({ PartNumber: p.partNumber, ETag: p.etag })) },
        }),
      );
    },
    abort: async (key, uploadId) => {
      await this.client.send(
        new AbortMultipartUploadCommand({ Bucket: this.bucket, Key: key, UploadId: uploadId }),
      );
    },
  };

  /**
   * Aborts the multipart uploads of writers that died: those whose marker has not been rewritten
   * for `olderThanSeconds`. (Upload sessions' multipart uploads have no marker: their expiry
   * aborts them.)
   */
  async sweepIncomplete(olderThanSeconds: number): Promise<number> {
    const before = Date.now() - olderThanSeconds * 1000;
    let swept = 0;
    let token: string | undefined;
    do {
      const page = await this.client.send(
        new ListObjectsV2Command({ Bucket: this.bucket, Prefix: MARKERS, ContinuationToken: token }),
      );
      for (const object of page.Contents ?? []) {
        if (!object.Key || (object.LastModified?.getTime() ?? 0) > before) continue;
        const marker = JSON.parse(await text(await this.get(object.Key))) as {
          key: string;
          uploadId: string;
        };
        await this.client
          .send(
            new AbortMultipartUploadCommand({
              Bucket: this.bucket,
              Key: marker.key,
              UploadId: marker.uploadId,
            }),
          )
          // NoSuchUpload: completed or aborted already. Any other failure is left to the bucket's
          // lifecycle rule (AbortIncompleteMultipartUpload), the backstop for every open upload.
          .catch(() => undefined);
        await this.delete(object.Key);
        swept++;
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
    return swept;
  }

  async ping(): Promise<void> {
    await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
  }

  close(): void {
    this.client.destroy();
  }
}
