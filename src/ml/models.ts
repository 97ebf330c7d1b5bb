import * as tf from "@tensorflow/tfjs";
import { batchNormalization } from "./batch-norm.js";

/** The model zoo. Layer names are fixed, so every member's weights have the same names. */
export type ModelSpec =
  | { kind: "mlp"; hidden: number[] }
  | { kind: "cnn"; channels: number[] }
  | { kind: "resnet20" };

/**
 * Builds a model for [height, width, channels] inputs and `classes` outputs (softmax), with
 * seeded initialisers: the same seed gives the same initial weights.
 * - mlp: flatten, dense-ReLU per hidden size, dense.
 * - cnn: per channel count, conv 3x3 (no bias) - BatchNorm - ReLU - maxpool 2; then dense.
 * - resnet20: the CIFAR ResNet-20 (He et al.): conv 16, three stages of three basic blocks
 *   (16, 32, 64 channels; stride 2 and a 1x1 projection where the shape changes), global
 *   average pooling, dense.
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
  } else if (spec.kind === "resnet20") {
    x = resnet20Body(x, init);
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
      x = batchNormalization({ name: `bn_${i}`, momentum: 0.9 }).apply(x) as tf.SymbolicTensor;
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

type Init = () => ReturnType<typeof tf.initializers.glorotUniform>;

function convBn(
  x: tf.SymbolicTensor,
  name: string,
  filters: number,
  kernelSize: number,
  strides: number,
  init: Init,
) {
  const conv = tf.layers
    .conv2d({
      name: `${name}_conv`,
      filters,
      kernelSize,
      strides,
      padding: "same",
      useBias: false,
      kernelInitializer: init(),
    })
    .apply(x) as tf.SymbolicTensor;
  return batchNormalization({ name: `${name}_bn`, momentum: 0.9 }).apply(conv) as tf.SymbolicTensor;
}

function resnet20Body(input: tf.SymbolicTensor, init: Init): tf.SymbolicTensor {
  const relu = (x: tf.SymbolicTensor, name: string) =>
    tf.layers.activation({ name, activation: "relu" }).apply(x) as tf.SymbolicTensor;
  let x = relu(convBn(input, "stem", 16, 3, 1, init), "stem_relu");
  [16, 32, 64].forEach((filters, stage) => {
    for (let block = 0; block < 3; block++) {
      const name = `s${stage}_b${block}`;
      const strides = stage > 0 && block === 0 ? 2 : 1;
      const h = relu(convBn(x, `${name}_1`, filters, 3, strides, init), `${name}_relu1`);
      const y = convBn(h, `${name}_2`, filters, 3, 1, init);
      const shortcut = strides === 1 ? x : convBn(x, `${name}_proj`, filters, 1, strides, init);
      x = relu(
        tf.layers.add({ name: `${name}_add` }).apply([y, shortcut]) as tf.SymbolicTensor,
        `${name}_relu2`,
      );
    }
  });
  return tf.layers.globalAveragePooling2d({ name: "gap" }).apply(x) as tf.SymbolicTensor;
}
