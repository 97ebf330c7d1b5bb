import * as tf from "@tensorflow/tfjs";
import { batchNormalization } from "./batch-norm.js";

type Conv2DLayer = ReturnType<typeof tf.layers.conv2d>;
type Conv2DArgs = Parameters<typeof tf.layers.conv2d>[0];
type Kwargs = Parameters<Conv2DLayer["call"]>[1];

/** TF.js's layer class (not exported by the package, reached through an instance). */
const TfConv2D = tf.layers.conv2d({ filters: 1, kernelSize: 1 }).constructor as new (
  args: Conv2DArgs,
) => Conv2DLayer;

/**
 * TF.js's Conv2D (same weights, config and class name: saved models are plain TF.js), computed by
 * tf.conv2d where TF.js's layer calls tf.fused.conv2d when it has no bias and no activation:
 * the fused op's gradient always computes its input's gradient too, which for a network's
 * first layer is the gradient of the images (a sixth of a CNN step on wasm, measured); the
 * plain op's gradient computes only what the backward pass uses.
 */
class Conv2D extends TfConv2D {
  override call(inputs: tf.Tensor | tf.Tensor[], kwargs: Kwargs): tf.Tensor | tf.Tensor[] {
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    const f = this as unknown as {
      kernel: tf.LayerVariable;
      bias: tf.LayerVariable | null;
      activation: { getClassName(): string };
      strides: [number, number];
      padding: "same" | "valid";
      dataFormat: string;
      dilationRate: [number, number];
    };
    const plain =
      x?.rank === 4 &&
      f.bias === null &&
      f.activation.getClassName() === "linear" &&
      f.dataFormat === "channelsLast";
    if (!plain) return super.call(inputs, kwargs);
    return tf.conv2d(
      x as tf.Tensor4D,
      f.kernel.read() as tf.Tensor4D,
      f.strides,
      f.padding,
      "NHWC",
      f.dilationRate,
    );
  }
}

/** `tf.layers.conv2d`, whose backward pass skips the gradient of what it does not need. */
function conv2d(args: Conv2DArgs): Conv2DLayer {
  return new Conv2D(args);
}

/** The model zoo. Layer names are fixed, so every member's weights have the same names. */
export type ModelSpec =
  | { kind: "mlp"; hidden: number[] }
  | { kind: "cnn"; channels: number[] }
  | { kind: "resnet20" };

/**
 * Builds a model for [height, width, channels] inputs and `classes` outputs, with seeded
 * initialisers: the same seed gives the same initial weights. Every kind ends with a dense
 * layer named `logits` and a softmax layer named `probabilities` (the model's output).
 * - mlp: flatten, dense-ReLU per hidden size.
 * - cnn: per channel count, conv 3x3 (no bias) - BatchNorm - ReLU - maxpool 2; flatten.
 * - resnet20: the CIFAR ResNet-20 (He et al.): conv 16, three stages of three basic blocks
 *   (16, 32, 64 channels; stride 2 and a 1x1 projection where the shape changes), global
 *   average pooling.
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
      x = conv2d({
        name: `conv_${i}`,
        filters,
        kernelSize: 3,
        padding: "same",
        useBias: false,
        kernelInitializer: init(),
      }).apply(x) as tf.SymbolicTensor;
      x = batchNormalization({ name: `bn_${i}`, momentum: 0.9 }).apply(x) as tf.SymbolicTensor;
      x = tf.layers.activation({ name: `relu_${i}`, activation: "relu" }).apply(x) as tf.SymbolicTensor;
      x = tf.layers.maxPooling2d({ name: `pool_${i}`, poolSize: 2 }).apply(x) as tf.SymbolicTensor;
    });
    x = tf.layers.flatten({ name: "flatten" }).apply(x) as tf.SymbolicTensor;
  }
  const logits = tf.layers
    .dense({ name: "logits", units: classes, kernelInitializer: init() })
    .apply(x) as tf.SymbolicTensor;
  const probabilities = tf.layers
    .activation({ name: "probabilities", activation: "softmax" })
    .apply(logits) as tf.SymbolicTensor;
  return tf.model({ inputs: input, outputs: probabilities });
}

/**
 * The same network up to its `logits` layer (shared layers and weights), what training
 * differentiates: the loss takes logits, the exported model gives probabilities.
 */
export function logitsModel(model: tf.LayersModel): tf.LayersModel {
  return tf.model({ inputs: model.inputs, outputs: model.getLayer("logits").output as tf.SymbolicTensor });
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
  const conv = conv2d({
    name: `${name}_conv`,
    filters,
    kernelSize,
    strides,
    padding: "same",
    useBias: false,
    kernelInitializer: init(),
  }).apply(x) as tf.SymbolicTensor;
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
