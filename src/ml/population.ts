import * as tf from "@tensorflow/tfjs";
import { mergeCoefficients } from "../merge/methods.js";
import { seededRandom, streamSeed } from "../random.js";
import { augmentedBatch, type Diversity, type DiversitySets, drawDiversity } from "./augmentation.js";
import { averageMembers, papaPull, pullToward, reestimateBatchNorm } from "./averaging.js";
import { type Dataset, type Split, shuffled, take } from "./datasets.js";
import { calibrationBatches, ensembleAccuracy, evaluate, memberAccuracies } from "./evaluation.js";
import { buildModel, logitsModel, type ModelSpec } from "./models.js";
import { MemberOptimizer, type OptimizerSpec } from "./optimizer.js";
import { learningRate, papaBeta } from "./schedule.js";
import { greedySoup, soupOf } from "./soups.js";
import { trainStep } from "./step.js";
import { captureState, restoreState, type TrainingState } from "./training-state.js";

export type { OptimizerSpec } from "./optimizer.js";
export type { TrainingState } from "./training-state.js";

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

export interface TrainingSpec {
  model: ModelSpec;
  population: PopulationSpec;
  diversity: DiversitySets;
  optimizer: OptimizerSpec;
  epochs: number;
  batchSize: number;
  /** The paper's base augmentation (random crop with 4-pixel padding, horizontal flip) for every member. */
  baseAugmentation: boolean;
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

/** One member of a population: its network (and the same network up to its logits), its optimizer, its diversity. */
export interface Member {
  index: number;
  model: tf.LayersModel;
  logits: tf.LayersModel;
  trainable: tf.Variable[];
  optimizer: MemberOptimizer;
  diversity: Diversity;
}

/** Examples of the training split held out for the greedy soup (fixed, whatever the run's seed). */
const HELD_OUT_SHARE = 0.02;

/** Batches BatchNorm statistics are re-estimated on after a hard average and for soups. */
export const CALIBRATION_BATCHES = 8;

/** The greedy soup's held-out examples (`HELD_OUT_SHARE`, a fixed draw) and the rest, which trains. */
export function holdOut(split: Split): { heldOut: Split; train: Split } {
  const count = Math.max(1, Math.floor(split.count * HELD_OUT_SHARE));
  const order = shuffled(split.count, streamSeed(0, "held-out"));
  return { heldOut: take(split, order.slice(0, count)), train: take(split, order.slice(count)) };
}

/** The diversity of every member of the population, a fixed draw from its seed. */
export function populationDiversity(spec: TrainingSpec): Diversity[] {
  const { population: pop } = spec;
  return drawDiversity(spec.diversity, pop.size, streamSeed(pop.seed, "diversity"));
}

/** Member `index`'s network as initialised (its seed's draw), whichever process builds it. */
export function memberModel(spec: TrainingSpec, data: Dataset, index: number): tf.LayersModel {
  return buildModel(spec.model, data.shape, data.classes, streamSeed(spec.population.seed, "init", index));
}

function createMembers(spec: TrainingSpec, data: Dataset, indices: number[]): Member[] {
  const diversity = populationDiversity(spec);
  return indices.map((index) => {
    const model = memberModel(spec, data, index);
    const trainable = model.trainableWeights.map((w) => w.read() as tf.Variable);
    return {
      index,
      model,
      logits: logitsModel(model),
      trainable,
      optimizer: new MemberOptimizer(spec.optimizer, trainable),
      diversity: diversity[index] as Diversity,
    };
  });
}

/** PAPA-all or PAPA-2 at the end of an epoch: the members' new weights, then their BatchNorm statistics. */
function hardAverage(members: Member[], spec: TrainingSpec, epoch: number, calibration: tf.Tensor[]): void {
  const { population: pop } = spec;
  const n = members.length;
  const rows =
    pop.variant === "papa-all"
      ? mergeCoefficients({ method: "papa-all" }, n)
      : mergeCoefficients({ method: "papa-2", seed: streamSeed(pop.seed, "papa-2", 0, epoch) }, n);
  averageMembers(
    members.map((m) => m.model),
    rows,
  );
  for (const m of members) reestimateBatchNorm(m.model, calibration);
}

/** What training and evaluation share: the held-out and training examples, the calibration batches. */
export interface PreparedData {
  heldOut: Split;
  train: Split;
  calibration: tf.Tensor[];
}

/** Splits the data (`holdOut`) and draws the calibration batches; dispose `calibration` after. */
export function prepareData(spec: TrainingSpec, data: Dataset): PreparedData {
  const { heldOut, train } = holdOut(data.train);
  const seed = streamSeed(spec.population.seed, "calibration");
  const calibration = calibrationBatches(train, data.shape, spec.batchSize, CALIBRATION_BATCHES, seed);
  return { heldOut, train, calibration };
}

/**
 * A part of a population trained in this process while the rest trains elsewhere: the members it
 * trains, and how they average with the others. The population's sync points are numbered
 * rounds (`syncRounds`); after the last, every member's final weights are gathered elsewhere.
 */
export interface Shard {
  /** The members this process trains (indices into the population). */
  members: number[];
  /**
   * Gives the population these members' weights at sync round `round` and writes into each what
   * the population gives back: the population's mean (papa, which then pulls by the schedule's
   * beta here) or the member's new weights (papa-all, papa-2).
   */
  exchange(round: number, members: Member[]): Promise<void>;
  /**
   * Where a shard that starts again (a retried job) resumes: writes into the members their
   * weights from the latest closed round and returns it, or returns null when none has closed.
   */
  resume(members: Member[]): Promise<number | null>;
}

/**
 * The sync rounds of a training: papa pulls every `everyKSteps` steps, papa-all and papa-2
 * average every `everyKEpochs` epochs but never after the last, independent never. `count`
 * rounds, round r after global step `after(r)`.
 */
export function syncRounds(
  spec: TrainingSpec,
  stepsPerEpoch: number,
): { count: number; after(r: number): number } {
  const { population: pop, epochs } = spec;
  if (pop.size < 2 || pop.variant === "independent") return { count: 0, after: () => 0 };
  if (pop.variant === "papa") {
    return {
      count: Math.floor((stepsPerEpoch * epochs) / pop.everyKSteps),
      after: (r) => (r + 1) * pop.everyKSteps,
    };
  }
  return {
    count: Math.floor((epochs - 1) / pop.everyKEpochs),
    after: (r) => (r + 1) * pop.everyKEpochs * stepsPerEpoch,
  };
}

/** Steps per epoch for the training examples of `prepared`. */
export function stepsPerEpoch(spec: TrainingSpec, prepared: PreparedData): number {
  return Math.ceil(prepared.train.count / spec.batchSize);
}

export interface TrainOptions {
  onProgress?: (p: Progress) => void;
  signal?: AbortSignal;
  /** Called after every epoch but the last with what `resume` needs to continue from there. */
  onEpochEnd?: (state: TrainingState) => Promise<void>;
  /** Continue a run from the state its `onEpochEnd` saved. */
  resume?: TrainingState | undefined;
}

/**
 * Trains the members of a population (all, or a `shard`'s) with PAPA (or PAPA-all, PAPA-2,
 * independent) and returns them. Every step runs inside `tf.tidy`; averaging runs as tf ops on
 * the members' variables, or through the shard. Every random stream (initialisation, data order,
 * augmentation, PAPA-2 pairs, calibration) has its own seed, `streamSeed(seed, purpose, member,
 * epoch)`, so a member trains the same in any process.
 */
export async function trainMembers(
  spec: TrainingSpec,
  data: Dataset,
  prepared: PreparedData,
  options: TrainOptions & { shard?: Shard | undefined } = {},
): Promise<Member[]> {
  const { population: pop, optimizer: o } = spec;
  const { train, calibration } = prepared;
  const { shard } = options;
  const members = createMembers(spec, data, shard?.members ?? Array.from({ length: pop.size }, (_, j) => j));
  const perEpoch = stepsPerEpoch(spec, prepared);
  const total = perEpoch * spec.epochs;
  const rounds = syncRounds(spec, perEpoch);
  const started = performance.now();
  const reestimate = () => {
    for (const m of members) reestimateBatchNorm(m.model, calibration);
  };
  let step = options.resume?.step ?? 0;
  try {
    if (options.resume) restoreState(members, options.resume);
    const resumed = shard ? await shard.resume(members) : null;
    if (resumed !== null) {
      step = rounds.after(resumed);
      if (pop.variant !== "papa") reestimate();
    }
    const firstStep = step;
    for (let epoch = Math.floor(step / perEpoch); epoch < spec.epochs; epoch++) {
      const orders = members.map((m) =>
        shuffled(train.count, streamSeed(pop.seed, "data-order", m.index, epoch)),
      );
      const randoms = members.map((m) => seededRandom(streamSeed(pop.seed, "augmentation", m.index, epoch)));
      for (let s = step - epoch * perEpoch; s < perEpoch; s++) {
        options.signal?.throwIfAborted();
        const lr = learningRate(o, step, total);
        let lossSum = 0;
        for (const [k, member] of members.entries()) {
          const ids = (orders[k] as number[]).slice(s * spec.batchSize, (s + 1) * spec.batchSize);
          const batch = augmentedBatch(
            train,
            ids,
            data.shape,
            data.classes,
            { diversity: member.diversity, baseAugmentation: spec.baseAugmentation },
            randoms[k] as () => number,
          );
          const loss = trainStep(
            member.logits,
            member.trainable,
            member.optimizer,
            tf.tensor4d(batch.x, [ids.length, ...data.shape]),
            tf.tensor2d(batch.y, [ids.length, data.classes]),
            lr,
          );
          // The loss is read (a sync) every 10 steps only.
          const value = s % 10 === 0 ? (loss.dataSync()[0] ?? Number.NaN) : 0;
          loss.dispose();
          if (!Number.isFinite(value)) {
            throw new DivergenceError(
              `member ${member.index} diverged at step ${step} (loss ${value}); lower the learning rate or the diversity`,
            );
          }
          lossSum += value;
        }
        step++;
        if (pop.variant === "papa" && rounds.count > 0 && step % pop.everyKSteps === 0) {
          const beta = papaBeta(pop, o, step, total);
          const models = members.map((m) => m.model);
          const round = step / pop.everyKSteps - 1;
          if (shard) await pullToward(models, beta, () => shard.exchange(round, members));
          else papaPull(models, beta);
        }
        if (s % 10 === 0) {
          const seconds = (performance.now() - started) / 1000;
          options.onProgress?.({
            epoch,
            step,
            steps: total,
            loss: lossSum / members.length,
            examplesPerSecond:
              ((step - firstStep) * spec.batchSize * members.length) / Math.max(seconds, 1e-9),
          });
        }
        await tf.nextFrame();
      }
      const hard = pop.variant === "papa-all" || pop.variant === "papa-2";
      if (hard && rounds.count > 0 && (epoch + 1) % pop.everyKEpochs === 0 && epoch + 1 < spec.epochs) {
        if (shard) {
          await shard.exchange((epoch + 1) / pop.everyKEpochs - 1, members);
          reestimate();
        } else {
          hardAverage(members, spec, epoch, calibration);
        }
      }
      if (options.onEpochEnd && epoch + 1 < spec.epochs) {
        await options.onEpochEnd(captureState(members, epoch + 1, step));
      }
    }
    return members;
  } catch (err) {
    for (const m of members) m.model.dispose();
    throw err;
  } finally {
    for (const m of members) m.optimizer.dispose();
  }
}

/** Members' evaluation by the process that has them: each one's test accuracy, their test probabilities summed. */
export interface MemberEvaluation {
  members: { member: number; accuracy: number }[];
  /** [test examples, classes], row-major: the sum of these members' class probabilities. */
  probabilities: Float32Array;
}

/** Evaluates members (`index`: their place in the population) on the test examples. */
export function evaluateMembers(
  members: { index: number; model: tf.LayersModel }[],
  data: Dataset,
): MemberEvaluation {
  const tested = memberAccuracies(
    members.map((m) => m.model),
    data.test,
    data.shape,
    data.classes,
  );
  return {
    members: members.map((m, k) => ({ member: m.index, accuracy: tested.members[k] ?? 0 })),
    probabilities: tested.probabilities,
  };
}

/** The uniform soup of a trained population (`models`, in member order), evaluated on the test examples. */
export function uniformSoup(
  spec: TrainingSpec,
  data: Dataset,
  prepared: PreparedData,
  models: tf.LayersModel[],
): Evaluated {
  const model = soupOf(models, spec.model, data, prepared.calibration);
  return { model, accuracy: evaluate(model, data.test, data.shape) };
}

/** What other processes evaluated of a population: some members, and perhaps the uniform soup. */
export interface EvaluatedElsewhere {
  evaluations: MemberEvaluation[];
  uniformSoup: Evaluated | null;
}

/**
 * Evaluates a trained population (`models`, in member order): each member on the held-out
 * examples, the greedy soup, each member and their ensemble on the test examples, and the
 * uniform soup. A placed training's lead evaluates the members `here` and the greedy soup, then
 * takes what the other shards evaluated meanwhile (`elsewhere`) and does what they did not.
 */
export async function evaluatePopulation(
  spec: TrainingSpec,
  data: Dataset,
  prepared: PreparedData,
  models: tf.LayersModel[],
  trainSeconds: number,
  placed?: { here: number[]; elsewhere: () => Promise<EvaluatedElsewhere> },
): Promise<TrainingOutcome> {
  const { heldOut, calibration } = prepared;
  const started = performance.now();
  const diversity = populationDiversity(spec);
  const heldOutAccuracy = models.map((model) => evaluate(model, heldOut, data.shape));
  const greedy = greedySoup(models, heldOutAccuracy, heldOut, spec.model, data, calibration);
  const greedyAccuracy = evaluate(greedy.model, data.test, data.shape);
  const membersOf = (indices: number[]) =>
    indices.map((index) => ({ index, model: models[index] as tf.LayersModel }));
  const evaluations = [evaluateMembers(membersOf(placed?.here ?? models.map((_, j) => j)), data)];
  const elsewhere = (await placed?.elsewhere()) ?? { evaluations: [], uniformSoup: null };
  evaluations.push(...elsewhere.evaluations);
  // What a shard that failed (or whose final weights were not taken) would have evaluated.
  const done = new Set(evaluations.flatMap((e) => e.members.map((m) => m.member)));
  const missing = models.flatMap((_, j) => (done.has(j) ? [] : [j]));
  if (missing.length > 0) evaluations.push(evaluateMembers(membersOf(missing), data));
  const byMember = new Map(evaluations.flatMap((e) => e.members.map((m) => [m.member, m.accuracy])));
  const sum = new Float32Array(data.test.count * data.classes);
  for (const e of evaluations) {
    for (let i = 0; i < sum.length; i++) sum[i] = (sum[i] as number) + (e.probabilities[i] as number);
  }
  return {
    members: models.map((model, j) => ({
      model,
      accuracy: byMember.get(j) ?? 0,
      heldOutAccuracy: heldOutAccuracy[j] ?? 0,
      diversity: diversity[j] as Diversity,
    })),
    ensembleAccuracy: ensembleAccuracy(sum, data.classes, data.test.y),
    uniformSoup: elsewhere.uniformSoup ?? uniformSoup(spec, data, prepared, models),
    greedySoup: { ...greedy, accuracy: greedyAccuracy },
    seconds: { train: trainSeconds, evaluate: (performance.now() - started) / 1000 },
  };
}

/**
 * Trains a whole population in this process (`trainMembers`) and evaluates it
 * (`evaluatePopulation`). `HELD_OUT_SHARE` of the training set is held out for the greedy soup.
 */
export async function trainPopulation(
  spec: TrainingSpec,
  data: Dataset,
  options: TrainOptions = {},
): Promise<TrainingOutcome> {
  const prepared = prepareData(spec, data);
  try {
    const started = performance.now();
    const members = await trainMembers(spec, data, prepared, options);
    const models = members.map((m) => m.model);
    try {
      return await evaluatePopulation(spec, data, prepared, models, (performance.now() - started) / 1000);
    } catch (err) {
      for (const m of models) m.dispose();
      throw err;
    }
  } finally {
    for (const b of prepared.calibration) b.dispose();
  }
}
