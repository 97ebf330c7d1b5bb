import { randomInt } from "../random.js";
import { type Split, shuffled } from "./datasets.js";

/** Each member gets one combination, drawn without replacement from the product of the sets. */
export interface DiversitySets {
  mixup: number[];
  labelSmoothing: number[];
  cutmix: number[];
  randomErasing: number[];
}

/** One member's regularisation: mixup and CutMix alphas, label smoothing, random-erasing probability. */
export interface Diversity {
  mixup: number;
  labelSmoothing: number;
  cutmix: number;
  randomErasing: number;
}

/** Draws one combination per member, without replacement (cycling once the product is used up). */
export function drawDiversity(sets: DiversitySets, members: number, seed: number): Diversity[] {
  const product: Diversity[] = [];
  for (const mixup of sets.mixup)
    for (const labelSmoothing of sets.labelSmoothing)
      for (const cutmix of sets.cutmix)
        for (const randomErasing of sets.randomErasing)
          product.push({ mixup, labelSmoothing, cutmix, randomErasing });
  const order = shuffled(product.length, seed);
  return Array.from({ length: members }, (_, j) => product[order[j % order.length] as number] as Diversity);
}

/** Random erasing as timm's `RandomErasing` (the official code's): area and aspect ranges, tries. */
export const ERASING = { minArea: 0.02, maxArea: 1 / 3, minAspect: 0.3, maxAspect: 1 / 0.3, attempts: 10 };

/** The paper's base augmentation for natural images: pad by 4 and crop back at random; flip half. */
const CROP_PADDING = 4;

function gamma(random: () => number, shape: number): number {
  // Marsaglia-Tsang; shape < 1 boosted.
  if (shape < 1) return gamma(random, shape + 1) * random() ** (1 / shape);
  const d = shape - 1 / 3;
  const c = 1 / Math.sqrt(9 * d);
  for (;;) {
    let x: number;
    let v: number;
    do {
      const u1 = random() || 1e-12;
      x = Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * random());
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    if (Math.log(random() || 1e-12) < 0.5 * x * x + d - d * v + d * Math.log(v)) return d * v;
  }
}

/** A Beta(a, a) draw. */
function symmetricBeta(random: () => number, a: number): number {
  const x = gamma(random, a);
  return x / (x + gamma(random, a));
}

type Shape = [number, number, number];

/** Random crop with `CROP_PADDING` zero padding, then a horizontal flip with probability 0.5, in place. */
function cropAndFlip(image: Float32Array, [h, w, c]: Shape, random: () => number): void {
  const span = 2 * CROP_PADDING + 1;
  const dy = randomInt(random, span) - CROP_PADDING;
  const dx = randomInt(random, span) - CROP_PADDING;
  const flip = random() < 0.5;
  const source = image.slice();
  for (let r = 0; r < h; r++) {
    for (let q = 0; q < w; q++) {
      const [sr, sq] = [r + dy, (flip ? w - 1 - q : q) + dx];
      const inside = sr >= 0 && sr < h && sq >= 0 && sq < w;
      for (let k = 0; k < c; k++)
        image[(r * w + q) * c + k] = inside ? (source[(sr * w + sq) * c + k] as number) : 0;
    }
  }
}

/**
 * timm's random erasing of one image, in place: up to `attempts` draws of an area (2-33% of the
 * image) and a log-uniform aspect ratio (0.3-3.3); the first box that fits is filled with
 * per-pixel uniform noise in [0, 1) (the pixel range here; timm's "pixel" mode draws normal
 * noise in its normalised space).
 */
function erase(image: Float32Array, [h, w, c]: Shape, random: () => number): void {
  const { minArea, maxArea, minAspect, maxAspect, attempts } = ERASING;
  for (let attempt = 0; attempt < attempts; attempt++) {
    const area = h * w * (minArea + (maxArea - minArea) * random());
    const aspect = Math.exp(Math.log(minAspect) + (Math.log(maxAspect) - Math.log(minAspect)) * random());
    const eh = Math.round(Math.sqrt(area * aspect));
    const ew = Math.round(Math.sqrt(area / aspect));
    if (eh < 1 || ew < 1 || eh >= h || ew >= w) continue;
    const top = randomInt(random, h - eh + 1);
    const left = randomInt(random, w - ew + 1);
    for (let r = top; r < top + eh; r++)
      for (let q = left; q < left + ew; q++)
        for (let k = 0; k < c; k++) image[(r * w + q) * c + k] = random();
    return;
  }
}

/**
 * timm's CutMix box for a mixing ratio: sides sqrt(1 - lam) of the image's, centred at a uniform
 * pixel and clipped to the image; returns the box and the ratio of what is left.
 */
export function cutmixBox(
  [h, w]: [number, number],
  lam: number,
  random: () => number,
): { top: number; left: number; bottom: number; right: number; lam: number } {
  const ratio = Math.sqrt(1 - lam);
  const [ch, cw] = [Math.floor(h * ratio), Math.floor(w * ratio)];
  const [cy, cx] = [randomInt(random, h), randomInt(random, w)];
  const clip = (v: number, max: number) => Math.min(max, Math.max(0, v));
  const box = {
    top: clip(cy - Math.floor(ch / 2), h),
    bottom: clip(cy + Math.floor(ch / 2), h),
    left: clip(cx - Math.floor(cw / 2), w),
    right: clip(cx + Math.floor(cw / 2), w),
  };
  return { ...box, lam: 1 - ((box.bottom - box.top) * (box.right - box.left)) / (h * w) };
}

/**
 * One augmented batch for a member, in the official pipeline's order: per image, the base
 * augmentation (natural images) and random erasing; then one-hot targets with label smoothing;
 * then, over the batch, mixup or CutMix (one of the two with probability 0.5 when both are on).
 */
export function augmentedBatch(
  data: Split,
  indices: number[],
  shape: Shape,
  classes: number,
  options: { diversity: Diversity; baseAugmentation: boolean },
  random: () => number,
): { x: Float32Array; y: Float32Array } {
  const d = options.diversity;
  const size = shape[0] * shape[1] * shape[2];
  const n = indices.length;
  const x = new Float32Array(n * size);
  const y = new Float32Array(n * classes);
  const off = d.labelSmoothing / classes;
  indices.forEach((idx, i) => {
    const image = x.subarray(i * size, (i + 1) * size);
    image.set(data.x.subarray(idx * size, (idx + 1) * size));
    if (options.baseAugmentation) cropAndFlip(image, shape, random);
    if (d.randomErasing > 0 && random() < d.randomErasing) erase(image, shape, random);
    y.fill(off, i * classes, (i + 1) * classes);
    y[i * classes + (data.y[idx] ?? 0)] = 1 - d.labelSmoothing + off;
  });
  const useMix = d.mixup > 0 && (d.cutmix === 0 || random() < 0.5);
  const useCut = !useMix && d.cutmix > 0;
  if (!useMix && !useCut) return { x, y };
  const drawn = symmetricBeta(random, useMix ? d.mixup : d.cutmix);
  const partner = shuffled(n, randomInt(random, 2 ** 31));
  const [xs, ys] = [x.slice(), y.slice()];
  const [h, w, c] = shape;
  const box = useCut ? cutmixBox([h, w], drawn, random) : null;
  const lam = box ? box.lam : drawn;
  for (let i = 0; i < n; i++) {
    const j = partner[i] as number;
    if (box) {
      for (let r = box.top; r < box.bottom; r++)
        for (let q = box.left; q < box.right; q++)
          for (let k = 0; k < c; k++)
            x[i * size + (r * w + q) * c + k] = xs[j * size + (r * w + q) * c + k] as number;
    } else {
      for (let k = 0; k < size; k++)
        x[i * size + k] = lam * (xs[i * size + k] as number) + (1 - lam) * (xs[j * size + k] as number);
    }
    for (let k = 0; k < classes; k++)
      y[i * classes + k] =
        lam * (ys[i * classes + k] as number) + (1 - lam) * (ys[j * classes + k] as number);
  }
  return { x, y };
}
