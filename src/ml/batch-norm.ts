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

/**
 * Inputs x, gamma, beta; outputs y, mean, variance (biased, as tf.moments). Two SIMD passes:
 * the per-channel sums of x and x^2 (float64), then y = x * scale + shift.
 */
function forward({ inputs, backend, attrs }: KernelCall): TensorInfo[] {
  const { x, gamma, beta } = inputs as { x: TensorInfo; gamma: TensorInfo; beta: TensorInfo };
  const epsilon = attrs.epsilon as number;
  const { channels, count, rows, outputs, simd } = start(backend, x);
  const [y, mean, variance] = outputs as [TensorInfo, TensorInfo, TensorInfo];
  const [px, py] = [simd.address(x), simd.address(y)];
  // Scratch: the sums (float64), then scale and shift.
  simd.withScratch(channels * 24, (at, buffer) => {
    const [scaleAt, shiftAt] = [at + channels * 16, at + channels * 20];
    const sums = new Float64Array(buffer, at, 2 * channels).fill(0);
    const scale = new Float32Array(buffer, scaleAt, channels);
    const shift = new Float32Array(buffer, shiftAt, channels);
    simd.channel_sums(px, px, rows, channels, at);
    const [g, b, m, v] = [gamma, beta, mean, variance].map((t) => heapOf(backend, t)) as [
      Float32Array,
      Float32Array,
      Float32Array,
      Float32Array,
    ];
    for (let c = 0; c < channels; c++) {
      const mc = (sums[c] as number) / rows;
      const vc = Math.max(0, (sums[channels + c] as number) / rows - mc * mc);
      m[c] = mc;
      v[c] = vc;
      scale[c] = (g[c] as number) / Math.sqrt(vc + epsilon);
      shift[c] = (b[c] as number) - mc * (scale[c] as number);
    }
    simd.affine(px, py, count, channels, scaleAt, shiftAt);
  });
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
  const [pdy, px, pdx] = [simd.address(dy), simd.address(x), simd.address(dx)];
  // Scratch: the sums (float64), then the coefficients a, b and k.
  simd.withScratch(channels * 28, (at, buffer) => {
    const [aAt, bAt, kAt] = [at + channels * 16, at + channels * 20, at + channels * 24];
    const sums = new Float64Array(buffer, at, 2 * channels).fill(0);
    const [a, b, k] = [aAt, bAt, kAt].map((offset) => new Float32Array(buffer, offset, channels)) as [
      Float32Array,
      Float32Array,
      Float32Array,
    ];
    simd.channel_sums(pdy, px, rows, channels, at);
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
      const sumDy = sums[c] as number;
      const sumDyXhat = s * ((sums[channels + c] as number) - m * sumDy);
      db[c] = sumDy;
      dg[c] = sumDyXhat;
      a[c] = (gamma[c] as number) * s;
      b[c] = (-(a[c] as number) * s * sumDyXhat + 2 * (dvariance[c] as number)) / rows;
      k[c] = (-(a[c] as number) * sumDy + (dmean[c] as number)) / rows - (b[c] as number) * m;
    }
    simd.affine2(pdy, px, pdx, count, channels, aAt, bAt, kAt);
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
    const epsilon = attrs.varianceEpsilon as number;
    const y = backend.makeOutput(x.shape, "float32");
    const simd = simdOn(backend);
    simd.withScratch(channels * 8, (at, buffer) => {
      const a = new Float32Array(buffer, at, channels);
      const b = new Float32Array(buffer, at + channels * 4, channels);
      const [m, v] = [mean, variance].map((t) => heapOf(backend, t)) as [Float32Array, Float32Array];
      const [o, g] = [offset, scale].map((t) => (t ? heapOf(backend, t) : null));
      for (let c = 0; c < channels; c++) {
        a[c] = (g ? (g[c] as number) : 1) / Math.sqrt((v[c] as number) + epsilon);
        b[c] = (o ? (o[c] as number) : 0) - (m[c] as number) * (a[c] as number);
      }
      simd.affine(
        simd.address(x),
        simd.address(y),
        tf.util.sizeFromShape(x.shape),
        channels,
        at,
        at + channels * 4,
      );
    });
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
  const backend = tf.backend() as BackendWasm;
  const simd = simdOn(backend);
  return simd.withScratch(channels * 16, (at, buffer) => {
    const sums = new Float64Array(buffer, at, 2 * channels).fill(0);
    simd.channel_sums(simd.address(x), simd.address(x), x.size / channels, channels, at);
    return { sum: sums.slice(0, channels), squares: sums.slice(channels) };
  });
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
