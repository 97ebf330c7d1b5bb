import * as tf from "@tensorflow/tfjs";
import { mergeCoefficients } from "../merge/methods.js";
import { randomInt, seededRandom } from "../random.js";
import { averageMembers, papaPull, reestimateBatchNorm } from "./averaging.js";
import { type Dataset, type Split, shuffled, take } from "./datasets.js";
import { buildModel, type ModelSpec, namedWeights } from "./models.js";
import { MemberOptimizer, type OptimizerSpec, type OptimizerState } from "./optimizer.js";

export type { OptimizerSpec } from "./optimizer.js";

export type Variant = "papa" | "papa-all" | "papa-2" | "independent";

/** A member's loss stopped being finite: the run cannot recover, and a retry would diverge the same way. */
export class DivergenceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DivergenceError";
  }
}

export interface PopulationSpec {
  size: number;
  variant: Variant;
  seed: number;
  /** papa: pull strength; beta = (1 - alpha) x lr_t / lr_0 with linear scaling. */
  alpha: number;
  everyKSteps: number;
  lrScaling: "linear" | "none";
  /** papa-all, papa-2: hard averages every k epochs, never at the last. */
  everyKEpochs: number;
}

/** Each member gets one combination, drawn without replacement from the product of the sets. */
export interface DiversitySets {
  mixup: number[];
  labelSmoothing: number[];
  cutmix: number[];
  randomErasing: number[];
}

export interface TrainingSpec {
  model: ModelSpec;
  population: PopulationSpec;
  diversity: DiversitySets;
  optimizer: OptimizerSpec;
  epochs: number;
  batchSize: number;
}

export interface Diversity {
  mixup: number;
  labelSmoothing: number;
  cutmix: number;
  randomErasing: number;
}

export interface Progress {
  epoch: number;
  step: number;
  steps: number;
  loss: number;
  examplesPerSecond: number;
}

export interface Evaluated {
  model: tf.LayersModel;
  accuracy: number;
}

export interface TrainingOutcome {
  members: (Evaluated & { diversity: Diversity; heldOutAccuracy: number })[];
  ensembleAccuracy: number;
  uniformSoup: Evaluated;
  /** Indices of the members in the greedy soup (each with weight 1/count). */
  greedySoup: Evaluated & { ingredients: number[] };
  seconds: { train: number; evaluate: number };
}

/**
 * Everything a population needs to continue after `epochs` completed epochs: every member's
 * weights (in `namedWeights` order) and optimizer state. Data order, augmentation draws and
 * diversity are functions of the seed and the epoch, so they need no saving.
 */
export interface TrainingState {
  epochs: number;
  step: number;
  members: { weights: Float32Array[]; optimizer: OptimizerState }[];
}

function captureState(
  members: tf.LayersModel[],
  optimizers: MemberOptimizer[],
  epochs: number,
  step: number,
): TrainingState {
  return {
    epochs,
    step,
    members: members.map((m, j) => ({
      weights: namedWeights(m).map((w) => w.variable.read().dataSync() as Float32Array),
      optimizer: (optimizers[j] as MemberOptimizer).state(),
    })),
  };
}

function restoreState(members: tf.LayersModel[], optimizers: MemberOptimizer[], state: TrainingState): void {
  if (state.members.length !== members.length) throw new Error("saved state is of another population size");
  members.forEach((m, j) => {
    const saved = state.members[j];
    if (!saved) return;
    namedWeights(m).forEach(({ variable }, i) => {
      const values = tf.tensor(saved.weights[i] ?? new Float32Array(0), variable.shape as number[]);
      variable.write(values);
      values.dispose();
    });
    (optimizers[j] as MemberOptimizer).restore(saved.optimizer);
  });
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

/**
 * Learning rate at step t of T: a linear warm-up to lr over the first warmupSteps, then cosine
 * from lr to minLr over the remaining steps, or constant.
 */
export function learningRate(o: OptimizerSpec, t: number, total: number): number {
  if (t < o.warmupSteps) return (o.lr * (t + 1)) / o.warmupSteps;
  if (o.schedule === "constant") return o.lr;
  const [u, span] = [t - o.warmupSteps, total - o.warmupSteps];
  return o.minLr + 0.5 * (o.lr - o.minLr) * (1 + Math.cos((Math.PI * u) / Math.max(1, span)));
}

/** The PAPA pull strength at step t: (1 - alpha), scaled by lr_t / lr_0 when `linear`. */
export function papaBeta(p: PopulationSpec, o: OptimizerSpec, t: number, total: number): number {
  const scale = p.lrScaling === "linear" ? learningRate(o, t, total) / o.lr : 1;
  return (1 - p.alpha) * scale;
}

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

function beta(random: () => number, a: number): number {
  const x = gamma(random, a);
  return x / (x + gamma(random, a));
}

/**
 * One augmented batch for a member: one-hot targets with label smoothing, then mixup or CutMix
 * (one of the two with probability 0.5 when both are on), then random erasing.
 */
function makeBatch(
  data: Split,
  indices: number[],
  shape: [number, number, number],
  classes: number,
  d: Diversity,
  random: () => number,
): { x: Float32Array; y: Float32Array } {
  const size = shape[0] * shape[1] * shape[2];
  const n = indices.length;
  const x = new Float32Array(n * size);
  const y = new Float32Array(n * classes);
  const off = d.labelSmoothing / classes;
  indices.forEach((idx, i) => {
    x.set(data.x.subarray(idx * size, (idx + 1) * size), i * size);
    y.fill(off, i * classes, (i + 1) * classes);
    y[i * classes + (data.y[idx] ?? 0)] = 1 - d.labelSmoothing + off;
  });
  const useMix = d.mixup > 0 && (d.cutmix === 0 || random() < 0.5);
  const useCut = !useMix && d.cutmix > 0;
  if (useMix || useCut) {
    const lam0 = beta(random, useMix ? d.mixup : d.cutmix);
    const partner = shuffled(n, randomInt(random, 2 ** 31));
    const xs = x.slice();
    const ys = y.slice();
    const [h, w, c] = shape;
    let lam = lam0;
    let box = [0, 0, 0, 0];
    if (useCut) {
      const ch = Math.round(h * Math.sqrt(1 - lam0));
      const cw = Math.round(w * Math.sqrt(1 - lam0));
      const top = randomInt(random, h - ch + 1);
      const left = randomInt(random, w - cw + 1);
      box = [top, left, ch, cw];
      lam = 1 - (ch * cw) / (h * w);
    }
    for (let i = 0; i < n; i++) {
      const j = partner[i] as number;
      if (useMix) {
        for (let k = 0; k < size; k++)
          x[i * size + k] = lam * (xs[i * size + k] as number) + (1 - lam) * (xs[j * size + k] as number);
      } else {
        const [top = 0, left = 0, ch = 0, cw = 0] = box;
        for (let r = top; r < top + ch; r++)
          for (let q = left; q < left + cw; q++)
            for (let k = 0; k < c; k++) {
              const at = ((r * w + q) * c + k) as number;
              x[i * size + at] = xs[j * size + at] as number;
            }
      }
      for (let k = 0; k < classes; k++) {
        y[i * classes + k] =
          lam * (ys[i * classes + k] as number) + (1 - lam) * (ys[j * classes + k] as number);
      }
    }
  }
  if (d.randomErasing > 0) {
    const [h, w, c] = shape;
    for (let i = 0; i < n; i++) {
      if (random() >= d.randomErasing) continue;
      const eh = 1 + randomInt(random, Math.max(1, Math.floor(h / 2)));
      const ew = 1 + randomInt(random, Math.max(1, Math.floor(w / 2)));
      const top = randomInt(random, h - eh + 1);
      const left = randomInt(random, w - ew + 1);
      for (let r = top; r < top + eh; r++)
        for (let q = left; q < left + ew; q++)
          for (let k = 0; k < c; k++) x[i * size + (r * w + q) * c + k] = random();
    }
  }
  return { x, y };
}

export function batchesOf(
  split: Split,
  shape: [number, number, number],
  batchSize: number,
  limit = Number.POSITIVE_INFINITY,
): tf.Tensor4D[] {
  const size = shape[0] * shape[1] * shape[2];
  const out: tf.Tensor4D[] = [];
  for (let start = 0; start < split.count && out.length < limit; start += batchSize) {
    const end = Math.min(split.count, start + batchSize);
    out.push(tf.tensor4d(split.x.subarray(start * size, end * size), [end - start, ...shape]));
  }
  return out;
}

/** Class probabilities of `model` on a split, as one [count, classes] tensor. */
function predictAll(model: tf.LayersModel, split: Split, shape: [number, number, number]): tf.Tensor2D {
  return tf.tidy(() => {
    const parts = batchesOf(split, shape, 256).map((b) => model.predict(b) as tf.Tensor2D);
    return tf.concat(parts, 0);
  });
}

function accuracyOf(probabilities: tf.Tensor2D, labels: Int32Array): number {
  const predicted = tf.tidy(() => tf.argMax(probabilities, 1).dataSync() as Int32Array);
  let right = 0;
  for (let i = 0; i < labels.length; i++) if (predicted[i] === labels[i]) right++;
  return labels.length === 0 ? 0 : right / labels.length;
}

export function evaluate(model: tf.LayersModel, split: Split, shape: [number, number, number]): number {
  const p = predictAll(model, split, shape);
  const acc = accuracyOf(p, split.y);
  p.dispose();
  return acc;
}

/** A new model whose weights are the average of the given members, BatchNorm re-estimated. */
export function soupOf(
  members: tf.LayersModel[],
  spec: ModelSpec,
  data: Dataset,
  calibration: tf.Tensor[],
): tf.LayersModel {
  const soup = buildModel(spec, data.shape, data.classes, 0);
  const targets = namedWeights(soup).map((w) => w.variable);
  const sources = members.map((m) => namedWeights(m).map((w) => w.variable));
  targets.forEach((target, i) => {
    const mean = tf.tidy(() => tf.mean(tf.stack(sources.map((s) => (s[i] as tf.LayerVariable).read())), 0));
    target.write(mean);
    mean.dispose();
  });
  reestimateBatchNorm(soup, calibration);
  return soup;
}

/**
 * Greedy soup: members sorted by held-out accuracy; start from the best; add the next member to
 * the running average only if held-out accuracy strictly improves. Returns the chosen indices.
 */
export function greedySoupIngredients(
  heldOut: number[],
  accuracyWith: (ingredients: number[]) => number,
): number[] {
  const order = heldOut.map((acc, i) => ({ acc, i })).sort((a, b) => b.acc - a.acc || a.i - b.i);
  const first = order[0];
  if (!first) return [];
  const chosen = [first.i];
  let best = first.acc;
  for (const { i } of order.slice(1)) {
    const acc = accuracyWith([...chosen, i]);
    if (acc > best) {
      chosen.push(i);
      best = acc;
    }
  }
  return chosen;
}

/**
 * One optimisation step of one member on one batch (soft labels `y`): forward in training mode,
 * cross-entropy, gradients of `trainable`, the optimizer's update. Takes ownership of `x` and `y`;
 * returns the batch's loss, which the caller disposes.
 */
export function trainStep(
  model: tf.LayersModel,
  trainable: tf.Variable[],
  optimizer: MemberOptimizer,
  x: tf.Tensor,
  y: tf.Tensor,
  lr: number,
): tf.Scalar {
  return tf.tidy(() => {
    const { value, grads } = tf.variableGrads(() => {
      const p = model.apply(x, { training: true }) as tf.Tensor;
      return tf.losses.softmaxCrossEntropy(y, tf.log(tf.clipByValue(p, 1e-7, 1))) as tf.Scalar;
    }, trainable);
    optimizer.step(
      trainable.map((v) => grads[v.name] as tf.Tensor),
      lr,
    );
    x.dispose();
    y.dispose();
    return value;
  });
}

/**
 * Trains a population with PAPA (or PAPA-all, PAPA-2, independent) and evaluates the members,
 * their ensemble, the uniform soup and the greedy soup. Every step runs inside `tf.tidy`;
 * averaging runs as tf ops on the members' variables. 2% of the training set (fixed seed) is
 * held out for the greedy soup.
 */
export async function trainPopulation(
  spec: TrainingSpec,
  data: Dataset,
  options: {
    onProgress?: (p: Progress) => void;
    signal?: AbortSignal;
    /** Called after every epoch but the last with what `resume` needs to continue from there. */
    onEpochEnd?: (state: TrainingState) => Promise<void>;
    /** Continue a run from the state its `onEpochEnd` saved. */
    resume?: TrainingState | undefined;
  } = {},
): Promise<TrainingOutcome> {
  const { population: pop, optimizer: o } = spec;
  const heldCount = Math.max(1, Math.floor(data.train.count * 0.02));
  const order = shuffled(data.train.count, 12345);
  const heldOut = take(data.train, order.slice(0, heldCount));
  const train = take(data.train, order.slice(heldCount));

  const diversity = drawDiversity(spec.diversity, pop.size, pop.seed);
  const members = diversity.map((_, j) =>
    buildModel(spec.model, data.shape, data.classes, pop.seed * 100 + j + 1),
  );
  const trainables = members.map((m) => m.trainableWeights.map((w) => w.read() as tf.Variable));
  const optimizers = trainables.map((params) => new MemberOptimizer(o, params));
  // Every random draw is a function of (seed, member, epoch): a resumed epoch replays exactly.
  const randomsFor = (epoch: number) =>
    members.map((_, j) => seededRandom(pop.seed * 7919 + j * 104729 + epoch));
  const stepsPerEpoch = Math.ceil(train.count / spec.batchSize);
  const total = stepsPerEpoch * spec.epochs;
  const calibration = batchesOf(train, data.shape, spec.batchSize, 8);
  const started = performance.now();
  let step = options.resume?.step ?? 0;
  try {
    if (options.resume) restoreState(members, optimizers, options.resume);
    for (let epoch = options.resume?.epochs ?? 0; epoch < spec.epochs; epoch++) {
      const orders = members.map((_, j) => shuffled(train.count, pop.seed * 1_000_003 + j * 7907 + epoch));
      const randoms = randomsFor(epoch);
      for (let s = 0; s < stepsPerEpoch; s++) {
        options.signal?.throwIfAborted();
        const lr = learningRate(o, step, total);
        let lossSum = 0;
        members.forEach((model, j) => {
          const ids = (orders[j] as number[]).slice(s * spec.batchSize, (s + 1) * spec.batchSize);
          const batch = makeBatch(
            train,
            ids,
            data.shape,
            data.classes,
            diversity[j] as Diversity,
            randoms[j] as () => number,
          );
          const loss = trainStep(
            model,
            trainables[j] as tf.Variable[],
            optimizers[j] as MemberOptimizer,
            tf.tensor4d(batch.x, [ids.length, ...data.shape]),
            tf.tensor2d(batch.y, [ids.length, data.classes]),
            lr,
          );
          // The loss is read (a sync) every 10 steps only.
          const value = s % 10 === 0 ? (loss.dataSync()[0] ?? Number.NaN) : 0;
          loss.dispose();
          if (!Number.isFinite(value)) {
            throw new DivergenceError(
              `member ${j} diverged at step ${step} (loss ${value}); lower the learning rate or the diversity`,
            );
          }
          lossSum += value;
        });
        step++;
        if (pop.variant === "papa" && members.length > 1 && step % pop.everyKSteps === 0) {
          papaPull(members, papaBeta(pop, o, step, total));
        }
        if (s % 10 === 0) {
          const seconds = (performance.now() - started) / 1000;
          options.onProgress?.({
            epoch,
            step,
            steps: total,
            loss: lossSum / members.length,
            examplesPerSecond: (step * spec.batchSize * members.length) / Math.max(seconds, 1e-9),
          });
        }
        await tf.nextFrame();
      }
      const hardAverage = (pop.variant === "papa-all" || pop.variant === "papa-2") && members.length > 1;
      if (hardAverage && (epoch + 1) % pop.everyKEpochs === 0 && epoch + 1 < spec.epochs) {
        const rows =
          pop.variant === "papa-all"
            ? mergeCoefficients({ method: "papa-all" }, members.length)
            : mergeCoefficients({ method: "papa-2", seed: pop.seed * 31 + epoch }, members.length);
        averageMembers(members, rows);
        for (const m of members) reestimateBatchNorm(m, calibration);
      }
      if (options.onEpochEnd && epoch + 1 < spec.epochs) {
        await options.onEpochEnd(captureState(members, optimizers, epoch + 1, step));
      }
    }
    const trainSeconds = (performance.now() - started) / 1000;
    const evalStart = performance.now();
    const probabilities = members.map((m) => predictAll(m, data.test, data.shape));
    const memberAcc = probabilities.map((p) => accuracyOf(p, data.test.y));
    const ensemble = tf.tidy(() => tf.div(tf.addN(probabilities), probabilities.length) as tf.Tensor2D);
    const ensembleAccuracy = accuracyOf(ensemble, data.test.y);
    ensemble.dispose();
    for (const p of probabilities) p.dispose();
    const heldOutAcc = members.map((m) => evaluate(m, heldOut, data.shape));
    const uniform = soupOf(members, spec.model, data, calibration);
    const ingredients = greedySoupIngredients(heldOutAcc, (chosen) => {
      const candidate = soupOf(
        chosen.map((i) => members[i] as tf.LayersModel),
        spec.model,
        data,
        calibration,
      );
      const acc = evaluate(candidate, heldOut, data.shape);
      candidate.dispose();
      return acc;
    });
    const greedy = soupOf(
      ingredients.map((i) => members[i] as tf.LayersModel),
      spec.model,
      data,
      calibration,
    );
    return {
      members: members.map((model, j) => ({
        model,
        accuracy: memberAcc[j] ?? 0,
        heldOutAccuracy: heldOutAcc[j] ?? 0,
        diversity: diversity[j] as Diversity,
      })),
      ensembleAccuracy,
      uniformSoup: { model: uniform, accuracy: evaluate(uniform, data.test, data.shape) },
      greedySoup: { model: greedy, accuracy: evaluate(greedy, data.test, data.shape), ingredients },
      seconds: { train: trainSeconds, evaluate: (performance.now() - evalStart) / 1000 },
    };
  } catch (err) {
    for (const m of members) m.dispose();
    throw err;
  } finally {
    for (const b of calibration) b.dispose();
    for (const opt of optimizers) opt.dispose();
  }
}
