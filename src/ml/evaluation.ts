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

/** Examples a prediction takes at once. */
const PREDICT_BATCH = 256;

/** Class probabilities of `model` on a split, as one [count, classes] tensor. */
function predictAll(model: tf.LayersModel, split: Split, shape: Shape): tf.Tensor2D {
  return tf.tidy(() => {
    const parts = batchesOf(split, shape, PREDICT_BATCH).map(
      (b) => model.predict(b, { batchSize: PREDICT_BATCH }) as tf.Tensor2D,
    );
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
 * Each member's accuracy on the split, and the sum of their class probabilities ([count, classes]
 * row-major), to which members evaluated elsewhere add theirs (`ensembleAccuracy`).
 */
export function memberAccuracies(
  members: tf.LayersModel[],
  split: Split,
  shape: Shape,
  classes: number,
): { members: number[]; probabilities: Float32Array } {
  const sum = new Float32Array(split.count * classes);
  const accuracies = members.map((m) => {
    const p = predictAll(m, split, shape);
    const values = p.dataSync();
    for (let i = 0; i < sum.length; i++) sum[i] = (sum[i] as number) + (values[i] as number);
    const accuracy = accuracyOf(p, split.y);
    p.dispose();
    return accuracy;
  });
  return { members: accuracies, probabilities: sum };
}

/**
 * The ensemble's accuracy from the sum of its members' class probabilities: it predicts the class
 * of their mean probability (the paper's "average of the predicted probabilities").
 */
export function ensembleAccuracy(probabilities: Float32Array, classes: number, labels: Int32Array): number {
  let right = 0;
  for (let i = 0; i < labels.length; i++) {
    let best = 0;
    for (let c = 1; c < classes; c++) {
      if ((probabilities[i * classes + c] as number) > (probabilities[i * classes + best] as number))
        best = c;
    }
    if (best === labels[i]) right++;
  }
  return labels.length === 0 ? 0 : right / labels.length;
}
