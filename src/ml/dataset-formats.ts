import { Transform, type TransformCallback, Writable } from "node:stream";
import { finished } from "node:stream/promises";
import { createGunzip, gunzipSync } from "node:zlib";
import type { Dataset, DatasetDescription, Split } from "./datasets.js";

export class DatasetError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DatasetError";
  }
}

/** An uploaded dataset passes the size limit (its files, or their content once gunzipped). */
export class DatasetTooLargeError extends DatasetError {
  constructor(readonly limitBytes: number) {
    super(
      `the dataset is larger than the limit of ${limitBytes} bytes (its files, or their gunzipped content)`,
    );
    this.name = "DatasetTooLargeError";
  }
}

export type UploadFormat = "idx" | "cifar10";

/** Whether a format holds natural images (cropped and flipped by default when trained on). */
export const NATURAL_IMAGES: Record<UploadFormat, boolean> = { idx: false, cifar10: true };

/** The files each format needs, by form field. */
export const UPLOAD_FIELDS: Record<UploadFormat, string[]> = {
  idx: ["train_images", "train_labels", "test_images", "test_labels"],
  cifar10: ["train", "test"],
};

/** What checking one file learned about its content (after gunzip). */
export type FileSummary =
  | { kind: "idx"; dims: number[] /** bytes before the data */; headerBytes: number; maxValue: number }
  | { kind: "cifar10"; records: number };

/** Bytes of one CIFAR-10 record: a label, then 32x32 pixels in three planes. */
const CIFAR_RECORD = 1 + 3072;

/**
 * Checks IDX content chunk by chunk (MNIST's format: 0x0000, type 0x08, rank, big-endian dims,
 * unsigned bytes): the header, and that the data is exactly as long as the dims say. For rank 1
 * (labels) it keeps the largest value.
 */
class IdxChecker {
  private head = Buffer.alloc(0);
  private dims: number[] | null = null;
  private dataBytes = 0;
  private maxValue = 0;

  push(chunk: Uint8Array): void {
    let data = chunk;
    if (!this.dims) {
      this.head = Buffer.concat([this.head, chunk]);
      if (this.head.length < 4) return;
      if (this.head[0] !== 0 || this.head[1] !== 0) throw new DatasetError("not an IDX file (bad magic)");
      if (this.head[2] !== 0x08) throw new DatasetError("only unsigned-byte IDX data is supported");
      const rank = this.head[3] ?? 0;
      if (rank < 1) throw new DatasetError("IDX header is truncated");
      if (this.head.length < 4 + 4 * rank) return;
      this.dims = Array.from({ length: rank }, (_, i) => this.head.readUInt32BE(4 + 4 * i));
      data = this.head.subarray(4 + 4 * rank);
      this.head = Buffer.alloc(0);
    }
    this.dataBytes += data.length;
    if (this.dims.length === 1) for (const v of data) if (v > this.maxValue) this.maxValue = v;
  }

  summary(): FileSummary {
    if (!this.dims) throw new DatasetError("IDX header is truncated");
    const size = this.dims.reduce((a, b) => a * b, 1);
    if (this.dataBytes !== size) {
      throw new DatasetError(`IDX data is ${this.dataBytes} bytes, its dimensions say ${size}`);
    }
    return { kind: "idx", dims: this.dims, headerBytes: 4 + 4 * this.dims.length, maxValue: this.maxValue };
  }
}

/** Checks CIFAR-10 binary content chunk by chunk: whole records, labels 0-9. */
class CifarChecker {
  private bytes = 0;

  push(chunk: Uint8Array): void {
    // Labels sit at multiples of the record size in the whole file.
    const first = (CIFAR_RECORD - (this.bytes % CIFAR_RECORD)) % CIFAR_RECORD;
    for (let i = first; i < chunk.length; i += CIFAR_RECORD) {
      const label = chunk[i] ?? 0;
      if (label > 9) {
        const record = (this.bytes + i) / CIFAR_RECORD;
        throw new DatasetError(`CIFAR-10 record ${record} has label ${label}, not 0-9`);
      }
    }
    this.bytes += chunk.length;
  }

  summary(): FileSummary {
    if (this.bytes === 0 || this.bytes % CIFAR_RECORD !== 0) {
      throw new DatasetError(
        `the file is ${this.bytes} bytes, not a whole number of ${CIFAR_RECORD}-byte records`,
      );
    }
    return { kind: "cifar10", records: this.bytes / CIFAR_RECORD };
  }
}

const checkerFor = (format: UploadFormat) => (format === "idx" ? new IdxChecker() : new CifarChecker());
const isGzip = (bytes: Uint8Array) => bytes[0] === 0x1f && bytes[1] === 0x8b;

/** Bytes still allowed, shared by the files of one upload. */
export interface UploadBudget {
  /** Bytes of the files as sent. */
  fileBytes: number;
  /** Bytes of their content, gunzipped. */
  contentBytes: number;
  readonly limitBytes: number;
}

/**
 * A pass-through stream for one uploaded dataset file: the bytes go on unchanged (to the store)
 * while their content - gunzipped when the file is gzip - is checked for `format`, drawing on
 * `budget` (`DatasetTooLargeError` once it is spent: a small gzip file may hold a huge dataset).
 * `summary()` once the stream has ended. Memory: a chunk at a time.
 */
export class DatasetFileCheck extends Transform {
  private readonly checker: IdxChecker | CifarChecker;
  private inner: Writable | null = null;
  private sink: Writable | null = null;
  private held: Buffer[] = [];

  constructor(
    format: UploadFormat,
    private readonly budget: UploadBudget,
  ) {
    super();
    this.checker = checkerFor(format);
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.budget.fileBytes -= chunk.length;
    if (this.budget.fileBytes < 0) {
      callback(new DatasetTooLargeError(this.budget.limitBytes));
    } else if (this.inner) {
      this.feed(chunk, () => callback(null, chunk));
    } else {
      // Gzip or not is told by the first two bytes, which may come one at a time.
      this.held.push(chunk);
      const head = Buffer.concat(this.held);
      if (head.length < 2) return void callback(null, chunk);
      this.held = [];
      this.start(isGzip(head));
      this.feed(head, () => callback(null, chunk));
    }
  }

  override _flush(callback: TransformCallback): void {
    if (!this.inner) this.start(false);
    const inner = this.inner as Writable;
    for (const chunk of this.held) inner.write(chunk);
    inner.end();
    finished(this.sink as Writable).then(
      () => callback(),
      (err: Error) => callback(err),
    );
  }

  summary(): FileSummary {
    return this.checker.summary();
  }

  private start(gzip: boolean): void {
    const sink = new Writable({
      write: (chunk: Buffer, _e, done) => {
        try {
          this.budget.contentBytes -= chunk.length;
          if (this.budget.contentBytes < 0) throw new DatasetTooLargeError(this.budget.limitBytes);
          this.checker.push(chunk);
          done();
        } catch (err) {
          done(err as Error);
        }
      },
    });
    const fail = (err: Error) =>
      this.destroy(
        err instanceof DatasetError ? err : new DatasetError(`the file cannot be read: ${err.message}`),
      );
    sink.on("error", fail);
    this.sink = sink;
    if (gzip) {
      const gunzip = createGunzip();
      gunzip.on("error", fail);
      gunzip.pipe(sink);
      this.inner = gunzip;
    } else {
      this.inner = sink;
    }
  }

  private feed(chunk: Buffer, done: () => void): void {
    const inner = this.inner as Writable;
    if (inner.write(chunk)) done();
    else inner.once("drain", done);
  }
}

/** An IDX images file and its labels file as one split: count, image shape, largest label. */
function describeIdxSplit(
  images: FileSummary,
  labels: FileSummary,
): { count: number; shape: [number, number, number]; maxLabel: number } {
  if (images.kind !== "idx" || labels.kind !== "idx") throw new Error("not IDX summaries");
  if (images.dims.length < 3)
    throw new DatasetError("IDX images must have at least 3 dimensions (count, height, width)");
  const [count = 0, h = 0, w = 1, c = 1] = images.dims;
  if (labels.dims.length !== 1 || labels.dims[0] !== count) {
    throw new DatasetError(`there are ${count} images but ${labels.dims[0]} labels`);
  }
  return { count, shape: [h, w, c], maxLabel: labels.maxValue };
}

/**
 * Checks that the files of an upload make a dataset of `format` (every field present, one file
 * each for IDX, counts and shapes that agree, 2 to 1000 classes) and describes it.
 */
export function describeUpload(
  format: UploadFormat,
  files: Record<string, FileSummary[]>,
): DatasetDescription {
  for (const field of UPLOAD_FIELDS[format]) {
    if (!files[field]?.length) throw new DatasetError(`a ${format} dataset needs the file field ${field}`);
  }
  if (format === "cifar10") {
    const records = (field: string) =>
      (files[field] ?? []).reduce((n, f) => n + (f.kind === "cifar10" ? f.records : 0), 0);
    return {
      shape: [32, 32, 3],
      classes: 10,
      trainCount: records("train"),
      testCount: records("test"),
      natural: NATURAL_IMAGES.cifar10,
    };
  }
  const one = (field: string): FileSummary => {
    const list = files[field] ?? [];
    if (list.length !== 1) throw new DatasetError(`${field} takes exactly one file`);
    return list[0] as FileSummary;
  };
  const train = describeIdxSplit(one("train_images"), one("train_labels"));
  const test = describeIdxSplit(one("test_images"), one("test_labels"));
  if (train.shape.join(",") !== test.shape.join(",")) {
    throw new DatasetError(`train images are [${train.shape}] but test images are [${test.shape}]`);
  }
  const classes = Math.max(train.maxLabel, test.maxLabel) + 1;
  if (classes < 2 || classes > 1000)
    throw new DatasetError(`labels span ${classes} classes; 2 to 1000 are supported`);
  return {
    shape: train.shape,
    classes,
    trainCount: train.count,
    testCount: test.count,
    natural: NATURAL_IMAGES.idx,
  };
}

/** A file's content (gunzipped when gzip), checked for `format`, with its summary. */
function checked(format: UploadFormat, raw: Uint8Array): { content: Uint8Array; summary: FileSummary } {
  const content = isGzip(raw) ? new Uint8Array(gunzipSync(raw)) : raw;
  const checker = checkerFor(format);
  checker.push(content);
  return { content, summary: checker.summary() };
}

/** IDX content (checked) as images in [0, 1] or labels. */
const idxPixels = (f: { content: Uint8Array; summary: FileSummary }) =>
  f.content.subarray(f.summary.kind === "idx" ? f.summary.headerBytes : 0);

/** An images file and a labels file in IDX format (gzip accepted), as one split. */
export function idxSplit(
  images: Uint8Array,
  labels: Uint8Array,
): { split: Split; shape: [number, number, number] } {
  const img = checked("idx", images);
  const lab = checked("idx", labels);
  const { count, shape } = describeIdxSplit(img.summary, lab.summary);
  const pixels = idxPixels(img);
  const x = new Float32Array(pixels.length);
  for (let i = 0; i < x.length; i++) x[i] = (pixels[i] as number) / 255;
  return { split: { x, y: Int32Array.from(idxPixels(lab)), count }, shape };
}

/**
 * CIFAR-10 binary batches (gzip accepted): records of 1 label byte and 3072 pixel bytes (32x32,
 * red plane, green plane, blue plane), converted to HWC floats in [0, 1].
 */
export function cifar10Split(batches: Uint8Array[]): Split {
  const contents = batches.map((b) => checked("cifar10", b).content);
  const count = contents.reduce((n, b) => n + b.length / CIFAR_RECORD, 0);
  const x = new Float32Array(count * 3072);
  const y = new Int32Array(count);
  let n = 0;
  for (const b of contents) {
    for (let r = 0; r < b.length; r += CIFAR_RECORD, n++) {
      y[n] = b[r] ?? 0;
      for (let p = 0; p < 1024; p++) {
        for (let c = 0; c < 3; c++) x[n * 3072 + p * 3 + c] = (b[r + 1 + c * 1024 + p] ?? 0) / 255;
      }
    }
  }
  return { x, y, count };
}

/** Parses and checks uploaded dataset files completely; the dataset, or a `DatasetError` naming the problem. */
export function parseUploadedDataset(
  name: string,
  format: UploadFormat,
  files: Record<string, Uint8Array[]>,
): Dataset {
  const summaries = Object.fromEntries(
    Object.entries(files).map(([field, list]) => [field, list.map((f) => checked(format, f).summary)]),
  );
  const { shape, classes } = describeUpload(format, summaries);
  const one = (field: string) => files[field]?.[0] ?? new Uint8Array(0);
  if (format === "cifar10") {
    return {
      name,
      shape,
      classes,
      train: cifar10Split(files.train ?? []),
      test: cifar10Split(files.test ?? []),
    };
  }
  const train = idxSplit(one("train_images"), one("train_labels")).split;
  const test = idxSplit(one("test_images"), one("test_labels")).split;
  return { name, shape, classes, train, test };
}
