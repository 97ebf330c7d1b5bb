import * as tf from "@tensorflow/tfjs";
import { mergeCoefficients } from "../merge/methods.js";
import { seededRandom, streamSeed } from "../random.js";
import { augmentedBatch, type Diversity, type DiversitySets, drawDiversity } from "./augmentation.js";
import { averageMembers, papaPull, reestimateBatchNorm } from "./averaging.js";
import { type Dataset, type Split, shuffled, take } from "./datasets.js";
import { calibrationBatches, evaluate, memberAndEnsembleAccuracy } from "./evaluation.js";
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

function createMembers(spec: TrainingSpec, data: Dataset): Member[] {
  const { population: pop } = spec;
  return drawDiversity(spec.diversity, pop.size, streamSeed(pop.seed, "diversity")).map(
    (diversity, index) => {
      const model = buildModel(spec.model, data.shape, data.classes, streamSeed(pop.seed, "init", index));
      const trainable = model.trainableWeights.map((w) => w.read() as tf.Variable);
      return {
        index,
        model,
        logits: logitsModel(model),
        trainable,
        optimizer: new MemberOptimizer(spec.optimizer, trainable),
        diversity,
      };
    },
  );
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

/**
 * Trains a population with PAPA (or PAPA-all, PAPA-2, independent) and evaluates the members,
 * their ensemble, the uniform soup and the greedy soup. Every step runs inside `tf.tidy`;
 * averaging runs as tf ops on the members' variables. `HELD_OUT_SHARE` of the training set is
 * held out for the greedy soup. Every random stream (initialisation, data order, augmentation,
 * PAPA-2 pairs, calibration) has its own seed, `streamSeed(seed, purpose, member, epoch)`.
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
  const { heldOut, train } = holdOut(data.train);

  const members = createMembers(spec, data);
  const stepsPerEpoch = Math.ceil(train.count / spec.batchSize);
  const total = stepsPerEpoch * spec.epochs;
  const calibration = calibrationBatches(
    train,
    data.shape,
    spec.batchSize,
    CALIBRATION_BATCHES,
    streamSeed(pop.seed, "calibration"),
  );
  const started = performance.now();
  let step = options.resume?.step ?? 0;
  try {
    if (options.resume) restoreState(members, options.resume);
    for (let epoch = options.resume?.epochs ?? 0; epoch < spec.epochs; epoch++) {
      const orders = members.map((m) =>
        shuffled(train.count, streamSeed(pop.seed, "data-order", m.index, epoch)),
      );
      const randoms = members.map((m) => seededRandom(streamSeed(pop.seed, "augmentation", m.index, epoch)));
      for (let s = 0; s < stepsPerEpoch; s++) {
        options.signal?.throwIfAborted();
        const lr = learningRate(o, step, total);
        let lossSum = 0;
        for (const member of members) {
          const ids = (orders[member.index] as number[]).slice(s * spec.batchSize, (s + 1) * spec.batchSize);
          const batch = augmentedBatch(
            train,
            ids,
            data.shape,
            data.classes,
            { diversity: member.diversity, baseAugmentation: spec.baseAugmentation },
            randoms[member.index] as () => number,
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
        if (pop.variant === "papa" && members.length > 1 && step % pop.everyKSteps === 0) {
          papaPull(
            members.map((m) => m.model),
            papaBeta(pop, o, step, total),
          );
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
      const hard = (pop.variant === "papa-all" || pop.variant === "papa-2") && members.length > 1;
      if (hard && (epoch + 1) % pop.everyKEpochs === 0 && epoch + 1 < spec.epochs) {
        hardAverage(members, spec, epoch, calibration);
      }
      if (options.onEpochEnd && epoch + 1 < spec.epochs) {
        await options.onEpochEnd(captureState(members, epoch + 1, step));
      }
    }
    const trainSeconds = (performance.now() - started) / 1000;
    const evalStart = performance.now();
    const models = members.map((m) => m.model);
    const tested = memberAndEnsembleAccuracy(models, data.test, data.shape);
    const heldOutAccuracy = models.map((m) => evaluate(m, heldOut, data.shape));
    const uniform = soupOf(models, spec.model, data, calibration);
    const greedy = greedySoup(models, heldOutAccuracy, heldOut, spec.model, data, calibration);
    return {
      members: members.map((m) => ({
        model: m.model,
        accuracy: tested.members[m.index] ?? 0,
        heldOutAccuracy: heldOutAccuracy[m.index] ?? 0,
        diversity: m.diversity,
      })),
      ensembleAccuracy: tested.ensemble,
      uniformSoup: { model: uniform, accuracy: evaluate(uniform, data.test, data.shape) },
      greedySoup: { ...greedy, accuracy: evaluate(greedy.model, data.test, data.shape) },
      seconds: { train: trainSeconds, evaluate: (performance.now() - evalStart) / 1000 },
    };
  } catch (err) {
    for (const m of members) m.model.dispose();
    throw err;
  } finally {
    for (const b of calibration) b.dispose();
    for (const m of members) m.optimizer.dispose();
  }
}
