import * as tf from "@tensorflow/tfjs";
import { type Split, shuffled, take } from "./datasets.js";

type Shape = [number, number, number];

/** A split's images in order, as batches of `batchSize` (the last may be smaller). */
function batchesOf(split: Split, shape: Shape, batchSize: number): tf.Tensor4D[] {
  const size = shape[0] * shape[1] * shape[2];
  const out: tf.Tensor4D[] = [];
  for (let start = 0; start < split.count; start += batchSize) {
    const end = Math.min(split.count, start + batchSize);
    out.push(tf.tensor4d(split.x.subarray(start * size, end * size), [end - start, ...shape]));
  }
  return out;
}

/**
 * The batches BatchNorm statistics are re-estimated on: `count` batches of distinct examples
 * drawn at random (seeded) from the whole split, without augmentation. (The first batches of a
 * split sorted by class would hold one or two classes: the built-in MNIST is.)
 */
export function calibrationBatches(
  split: Split,
  shape: Shape,
  batchSize: number,
  count: number,
  seed: number,
): tf.Tensor4D[] {
  const drawn = shuffled(split.count, seed).slice(0, batchSize * count);
  return batchesOf(take(split, drawn), shape, batchSize);
}

/** Class probabilities of `model` on a split, as one [count, classes] tensor. */
function predictAll(model: tf.LayersModel, split: Split, shape: Shape): tf.Tensor2D {
  return tf.tidy(() => {
    const parts = batchesOf(split, shape, 256).map((b) => model.predict(b) as tf.Tensor2D);
    return tf.concat(parts, 0);
  });
}

/** The share of rows whose largest probability is at the label. */
function accuracyOf(probabilities: tf.Tensor2D, labels: Int32Array): number {
  const predicted = tf.tidy(() => tf.argMax(probabilities, 1).dataSync() as Int32Array);
  let right = 0;
  for (let i = 0; i < labels.length; i++) if (predicted[i] === labels[i]) right++;
  return labels.length === 0 ? 0 : right / labels.length;
}

export function evaluate(model: tf.LayersModel, split: Split, shape: Shape): number {
  const p = predictAll(model, split, shape);
  const acc = accuracyOf(p, split.y);
  p.dispose();
  return acc;
}

/**
 * Each member's accuracy and the ensemble's: the ensemble predicts the class of the members'
 * mean probability (the paper's "average of the predicted probabilities").
 */
export function memberAndEnsembleAccuracy(
  members: tf.LayersModel[],
  split: Split,
  shape: Shape,
): { members: number[]; ensemble: number } {
  const probabilities = members.map((m) => predictAll(m, split, shape));
  try {
    const ensemble = tf.tidy(() => tf.div(tf.addN(probabilities), probabilities.length) as tf.Tensor2D);
    const accuracy = accuracyOf(ensemble, split.y);
    ensemble.dispose();
    return { members: probabilities.map((p) => accuracyOf(p, split.y)), ensemble: accuracy };
  } finally {
    for (const p of probabilities) p.dispose();
  }
}
