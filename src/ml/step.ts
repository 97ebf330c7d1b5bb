import * as tf from "@tensorflow/tfjs";
import type { MemberOptimizer } from "./optimizer.js";

/**
 * One optimisation step of one member on one batch (soft labels `y`): forward in training mode
 * up to the logits (`logitsModel`), softmax cross-entropy on the logits (TF.js computes it
 * through log-sum-exp: stable, and its gradient never vanishes where a probability underflows),
 * gradients of `trainable`, the optimizer's update. Takes ownership of `x` and `y`; returns the
 * batch's loss, which the caller disposes.
 */
export function trainStep(
  logits: tf.LayersModel,
  trainable: tf.Variable[],
  optimizer: MemberOptimizer,
  x: tf.Tensor,
  y: tf.Tensor,
  lr: number,
): tf.Scalar {
  return tf.tidy(() => {
    const { value, grads } = tf.variableGrads(
      () => tf.losses.softmaxCrossEntropy(y, logits.apply(x, { training: true }) as tf.Tensor) as tf.Scalar,
      trainable,
    );
    optimizer.step(
      trainable.map((v) => grads[v.name] as tf.Tensor),
      lr,
    );
    x.dispose();
    y.dispose();
    return value;
  });
}
