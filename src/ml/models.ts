import * as tf from "@tensorflow/tfjs";

/** The model zoo. Layer names are fixed, so every member's weights have the same names. */
export type ModelSpec = { kind: "mlp"; hidden: number[] } | { kind: "cnn"; channels: number[] };

export function usesConvolutions(spec: ModelSpec): boolean {
  return spec.kind === "cnn";
}

/**
 * Builds a model for [height, width, channels] inputs and `classes` outputs (softmax), with
 * seeded initialisers: the same seed gives the same initial weights.
 * - mlp: flatten, dense-ReLU per hidden size, dense.
 * - cnn: per channel count, conv 3x3 (no bias) - BatchNorm - ReLU - maxpool 2; then dense.
 */
export function buildModel(
  spec: ModelSpec,
  shape: [number, number, number],
  classes: number,
  seed: number,
): tf.LayersModel {
  let n = 0;
  const init = () => tf.initializers.glorotUniform({ seed: seed * 1000 + n++ });
  const input = tf.input({ shape });
  let x = input as tf.SymbolicTensor;
  if (spec.kind === "mlp") {
    x = tf.layers.flatten({ name: "flatten" }).apply(x) as tf.SymbolicTensor;
    spec.hidden.forEach((units, i) => {
      x = tf.layers
        .dense({ name: `dense_${i}`, units, activation: "relu", kernelInitializer: init() })
        .apply(x) as tf.SymbolicTensor;
    });
  } else {
    spec.channels.forEach((filters, i) => {
      x = tf.layers
        .conv2d({
          name: `conv_${i}`,
          filters,
          kernelSize: 3,
          padding: "same",
          useBias: false,
          kernelInitializer: init(),
        })
        .apply(x) as tf.SymbolicTensor;
      x = tf.layers.batchNormalization({ name: `bn_${i}`, momentum: 0.9 }).apply(x) as tf.SymbolicTensor;
      x = tf.layers.activation({ name: `relu_${i}`, activation: "relu" }).apply(x) as tf.SymbolicTensor;
      x = tf.layers.maxPooling2d({ name: `pool_${i}`, poolSize: 2 }).apply(x) as tf.SymbolicTensor;
    });
    x = tf.layers.flatten({ name: "flatten" }).apply(x) as tf.SymbolicTensor;
  }
  const output = tf.layers
    .dense({ name: "logits", units: classes, activation: "softmax", kernelInitializer: init() })
    .apply(x) as tf.SymbolicTensor;
  return tf.model({ inputs: input, outputs: output });
}

/** A model's weights in a stable order, with stable names (`layer/weight`). */
export function namedWeights(model: tf.LayersModel): { name: string; variable: tf.LayerVariable }[] {
  return model.layers.flatMap((layer) =>
    layer.weights.map((w) => ({ name: `${layer.name}/${w.originalName.split("/").pop()}`, variable: w })),
  );
}
