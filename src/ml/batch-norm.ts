import * as tf from "@tensorflow/tfjs";
import type { BackendWasm } from "@tensorflow/tfjs-backend-wasm";
import { type KernelCall, simdOn } from "./simd.js";

/**
 * Batch normalisation in training mode as two fused kernels on wasm: forward (the batch's mean
 * and variance per channel, and the normalised output) and backward (every gradient at once).
 * TF.js's own layer differentiates moments + batchNorm op by op: ~60 passes over the activations
 * per step of the CNN (Sum, Mean, Multiply, Identity, FusedBatchNorm...), where these take four.
 * Channels last (the layer's default axis); other backends keep TF.js's layer as it is.
 */
const FORWARD = "PapaBatchNormTraining";
const BACKWARD = "PapaBatchNormTrainingGrad";

type TensorInfo = tf.TensorInfo;

/**
 * What both kernels start from: x's channels (its last axis), element and row counts, three
 * float32 outputs (one shaped like x, two with one value per channel) and simd.wat's loops.
 */
function start(backend: BackendWasm, x: TensorInfo) {
  const channels = x.shape.at(-1) as number;
  const count = tf.util.sizeFromShape(x.shape);
  const outputs: TensorInfo[] = [
    backend.makeOutput(x.shape, "float32"),
    backend.makeOutput([channels], "float32"),
    backend.makeOutput([channels], "float32"),
  ];
  return { channels, count, rows: count / channels, outputs, simd: simdOn(backend) };
}

type Simd = ReturnType<typeof simdOn>;

/**
 * Per-channel (last axis) sums of u and of u * v, float32 tensors of one shape in the backend's
 * memory, in float64: one SIMD pass.
 */
function sumsOf(simd: Simd, u: TensorInfo, v: TensorInfo): { sum: Float64Array; products: Float64Array } {
  const channels = u.shape.at(-1) as number;
  const rows = tf.util.sizeFromShape(u.shape) / channels;
  return simd.withScratch(channels * 16, (at, buffer) => {
    const sums = new Float64Array(buffer, at, 2 * channels).fill(0);
    simd.channel_sums(simd.address(u), simd.address(v), rows, channels, at);
    return { sum: sums.slice(0, channels), products: sums.slice(channels) };
  });
}

/**
 * y = gamma * (x - mean) / sqrt(variance + epsilon) + beta per channel (last axis), as one SIMD
 * pass of y = x * scale + shift, scale and shift computed per channel. Without gamma, 1; without
 * beta, 0.
 */
function normalise(
  backend: BackendWasm,
  simd: Simd,
  x: TensorInfo,
  y: TensorInfo,
  stats: { mean: ArrayLike<number>; variance: ArrayLike<number> },
  gamma: TensorInfo | undefined,
  beta: TensorInfo | undefined,
  epsilon: number,
): void {
  const channels = stats.mean.length;
  simd.withScratch(channels * 8, (at, buffer) => {
    const scale = new Float32Array(buffer, at, channels);
    const shift = new Float32Array(buffer, at + channels * 4, channels);
    const [g, b] = [gamma, beta].map((t) => (t ? heapOf(backend, t) : null));
    for (let c = 0; c < channels; c++) {
      const m = stats.mean[c] as number;
      scale[c] = (g ? (g[c] as number) : 1) / Math.sqrt((stats.variance[c] as number) + epsilon);
      shift[c] = (b ? (b[c] as number) : 0) - m * (scale[c] as number);
    }
    const count = tf.util.sizeFromShape(x.shape);
    simd.affine(simd.address(x), simd.address(y), count, channels, at, at + channels * 4);
  });
}

/**
 * Inputs x, gamma, beta; outputs y, mean, variance (biased, as tf.moments). Two SIMD passes:
 * the per-channel sums of x and x^2 (float64), then y = x * scale + shift.
 */
function forward({ inputs, backend, attrs }: KernelCall): TensorInfo[] {
  const { x, gamma, beta } = inputs as { x: TensorInfo; gamma: TensorInfo; beta: TensorInfo };
  const { rows, outputs, simd } = start(backend, x);
  const [y, mean, variance] = outputs as [TensorInfo, TensorInfo, TensorInfo];
  const { sum, products } = sumsOf(simd, x, x);
  const m = sum.map((s) => s / rows);
  const v = products.map((p, c) => Math.max(0, p / rows - (m[c] as number) * (m[c] as number)));
  heapOf(backend, mean).set(m);
  heapOf(backend, variance).set(v);
  normalise(backend, simd, x, y, { mean: m, variance: v }, gamma, beta, attrs.epsilon as number);
  return outputs;
}

/**
 * Inputs dy, x, gamma, mean, variance and the gradients reaching mean and variance (the layer's
 * moving averages use them, not the loss: zeros); outputs dx, dgamma, dbeta. With
 * s = 1/sqrt(variance + epsilon) and N rows: dbeta = sum(dy), dgamma = s * sum(dy * (x - mean)),
 * dx = gamma*s*(dy - dbeta/N - s*(x - mean)*dgamma/N) + dmean/N + 2*dvariance*(x - mean)/N,
 * computed per channel as dx = a*dy + b*x + k. Two SIMD passes: sums of dy and dy*x, then dx.
 */
function backward({ inputs, backend, attrs }: KernelCall): TensorInfo[] {
  const { dy, x } = inputs as { dy: TensorInfo; x: TensorInfo };
  const epsilon = attrs.epsilon as number;
  const { channels, count, rows, outputs, simd } = start(backend, x);
  const [dx, dgamma, dbeta] = outputs as [TensorInfo, TensorInfo, TensorInfo];
  const sums = sumsOf(simd, dy, x);
  // Scratch: the coefficients a, b and k.
  simd.withScratch(channels * 12, (at, buffer) => {
    const [aAt, bAt, kAt] = [at, at + channels * 4, at + channels * 8];
    const [a, b, k] = [aAt, bAt, kAt].map((offset) => new Float32Array(buffer, offset, channels)) as [
      Float32Array,
      Float32Array,
      Float32Array,
    ];
    const [gamma, mean, variance, dmean, dvariance, dg, db] = [
      inputs.gamma,
      inputs.mean,
      inputs.variance,
      inputs.dmean,
      inputs.dvariance,
      dgamma,
      dbeta,
    ].map((t) => heapOf(backend, t as TensorInfo)) as Float32Array[] as [
      Float32Array,
      Float32Array,
      Float32Array,
      Float32Array,
      Float32Array,
      Float32Array,
      Float32Array,
    ];
    for (let c = 0; c < channels; c++) {
      const m = mean[c] as number;
      const s = 1 / Math.sqrt((variance[c] as number) + epsilon);
      const sumDy = sums.sum[c] as number;
      const sumDyXhat = s * ((sums.products[c] as number) - m * sumDy);
      db[c] = sumDy;
      dg[c] = sumDyXhat;
      a[c] = (gamma[c] as number) * s;
      b[c] = (-(a[c] as number) * s * sumDyXhat + 2 * (dvariance[c] as number)) / rows;
      k[c] = (-(a[c] as number) * sumDy + (dmean[c] as number)) / rows - (b[c] as number) * m;
    }
    simd.affine2(simd.address(dy), simd.address(x), simd.address(dx), count, channels, aAt, bAt, kAt);
  });
  return outputs;
}

function heapOf(backend: BackendWasm, t: TensorInfo): Float32Array {
  return backend.typedArrayFromHeap(t) as Float32Array;
}

/**
 * Batch normalisation in inference mode (TF.js's FusedBatchNorm kernel) on wasm, where x is
 * float32 with channels last, a multiple of 4, and the statistics and parameters are one value
 * per channel: y = x * scale + shift, one SIMD pass, scale and shift computed per channel.
 * wasm's own kernel took a quarter of the CNN's inference. Other inputs go to `original`.
 */
export function batchNormInferenceWith(original: tf.KernelFunc) {
  return (call: KernelCall): TensorInfo => {
    const { inputs, backend, attrs } = call;
    const { x, mean, variance, offset, scale } = inputs as Record<string, TensorInfo | undefined> & {
      x: TensorInfo;
      mean: TensorInfo;
      variance: TensorInfo;
    };
    const channels = x.shape.at(-1) ?? 0;
    const parameters = [mean, variance, offset, scale].filter((t) => t !== undefined);
    const ours =
      channels % 4 === 0 &&
      tf.util.sizeFromShape(x.shape) > 0 &&
      [x, ...parameters].every((t) => t.dtype === "float32") &&
      parameters.every((t) => tf.util.sizeFromShape(t.shape) === channels);
    if (!ours) return original(call as never) as TensorInfo;
    const y = backend.makeOutput(x.shape, "float32");
    // Copies: the scratch `normalise` takes may grow (and detach) the memory under these views.
    const stats = {
      mean: Float32Array.from(heapOf(backend, mean)),
      variance: Float32Array.from(heapOf(backend, variance)),
    };
    normalise(backend, simdOn(backend), x, y, stats, scale, offset, attrs.varianceEpsilon as number);
    return y;
  };
}

/**
 * Per-channel (last axis) sums of x and of x squared, in float64: one SIMD pass on wasm (float32
 * x, channels a multiple of 4), TF.js ops elsewhere.
 */
export function channelSums(x: tf.Tensor): { sum: Float64Array; squares: Float64Array } {
  const channels = x.shape.at(-1) ?? 0;
  if (tf.getBackend() !== "wasm" || x.dtype !== "float32" || channels % 4 !== 0 || x.size === 0) {
    const axes = Array.from({ length: x.rank - 1 }, (_, i) => i);
    const [sum, squares] = tf.tidy(() => [tf.sum(x, axes), tf.sum(tf.square(x), axes)]);
    try {
      return { sum: Float64Array.from(sum.dataSync()), squares: Float64Array.from(squares.dataSync()) };
    } finally {
      sum.dispose();
      squares.dispose();
    }
  }
  const { sum, products } = sumsOf(simdOn(tf.backend() as BackendWasm), x, x);
  return { sum, squares: products };
}

/** Registers both kernels on wasm and the forward kernel's gradient. Called with our wasm kernels. */
export function registerBatchNormKernels(): void {
  tf.registerKernel({ kernelName: FORWARD, backendName: "wasm", kernelFunc: forward as never });
  tf.registerKernel({ kernelName: BACKWARD, backendName: "wasm", kernelFunc: backward as never });
  tf.registerGradient({
    kernelName: FORWARD,
    inputsToSave: ["x", "gamma"],
    outputsToSave: [false, true, true],
    gradFunc: (dys, saved, attrs) => {
      const [dy, dmean, dvariance] = dys as tf.Tensor[];
      const [x, gamma, mean, variance] = saved;
      // Computed here, once: TF.js calls each input's closure in a tidy of its own.
      const [dx, dgamma, dbeta] = tf
        .engine()
        .runKernel(BACKWARD, { dy, x, gamma, mean, variance, dmean, dvariance } as never, attrs as never) as [
        tf.Tensor,
        tf.Tensor,
        tf.Tensor,
      ];
      return { x: () => dx, gamma: () => dgamma, beta: () => dbeta };
    },
  });
}

type BatchNormalization = ReturnType<typeof tf.layers.batchNormalization>;
type BatchNormalizationArgs = NonNullable<Parameters<typeof tf.layers.batchNormalization>[0]>;
type Kwargs = Parameters<BatchNormalization["call"]>[1];

/** TF.js's layer class (not exported by the package, reached through an instance). */
const TfBatchNormalization = tf.layers.batchNormalization().constructor as new (
  args?: BatchNormalizationArgs,
) => BatchNormalization;

/** The fields of TF.js's layer that the training path reads (private in its typings). */
interface Fields {
  axis: number;
  momentum: number;
  epsilon: number;
  gamma: tf.LayerVariable | null;
  beta: tf.LayerVariable | null;
  movingMean: tf.LayerVariable;
  movingVariance: tf.LayerVariable;
}

/**
 * TF.js's BatchNormalization with the fused kernels in training mode on wasm. Same weights, same
 * config and class name: saved models are ordinary TF.js BatchNormalization layers.
 */
class FusedBatchNormalization extends TfBatchNormalization {
  override call(inputs: tf.Tensor | tf.Tensor[], kwargs: Kwargs): tf.Tensor | tf.Tensor[] {
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    const f = this as unknown as Fields;
    const { gamma, beta } = f;
    const fused =
      kwargs.training === true &&
      tf.getBackend() === "wasm" &&
      x?.dtype === "float32" &&
      (f.axis === -1 || f.axis === x.rank - 1) &&
      (x.shape.at(-1) as number) % 4 === 0 &&
      gamma !== null &&
      beta !== null;
    if (!fused) return super.call(inputs, kwargs);
    return tf.tidy(() => {
      const [y, mean, variance] = tf
        .engine()
        .runKernel(
          FORWARD,
          { x, gamma: gamma.read(), beta: beta.read() } as never,
          { epsilon: f.epsilon } as never,
        ) as [tf.Tensor, tf.Tensor, tf.Tensor];
      // The moving averages, as TF.js's layer updates them.
      for (const [moving, value] of [
        [f.movingMean, mean],
        [f.movingVariance, variance],
      ] as const) {
        const old = moving.read();
        moving.write(tf.sub(old, tf.mul(tf.sub(old, value), 1 - f.momentum)));
      }
      return y;
    });
  }
}

/** `tf.layers.batchNormalization`, fused when training on wasm. */
export function batchNormalization(args: BatchNormalizationArgs): BatchNormalization {
  return new FusedBatchNormalization(args);
}
