import * as tf from "@tensorflow/tfjs";
import type { BackendWasm } from "@tensorflow/tfjs-backend-wasm";
import { batchNormInferenceWith, registerBatchNormKernels } from "./batch-norm.js";
import { SGD_STEP_KERNEL } from "./optimizer.js";
import { type KernelCall, simdOn, windowOf } from "./simd.js";

type TensorInfo = tf.TensorInfo;
type Attrs = Record<string, unknown>;

/** Calls a kernel already registered for wasm, as its own kernels call each other. */
function run(name: string, inputs: Record<string, TensorInfo>, backend: BackendWasm, attrs: Attrs = {}) {
  const kernel = tf.getKernel(name, "wasm");
  if (!kernel) throw new Error(`the wasm backend has no ${name} kernel`);
  return kernel.kernelFunc({ inputs, backend, attrs } as never) as TensorInfo;
}

/** Swaps the last two axes. */
function transposeLastTwo(x: TensorInfo, backend: BackendWasm): TensorInfo {
  const perm = x.shape.map((_, i) => i);
  const r = perm.length;
  [perm[r - 2], perm[r - 1]] = [perm[r - 1] as number, perm[r - 2] as number];
  return run("Transpose", { x }, backend, { perm });
}

/**
 * BatchMatMul (float32) on simd.wat's matmul, which reads transposed operands in place and
 * copies only the block of B it works on. wasm's own kernel packs all of B on every call (in a
 * training step B is new weights each time: the packing took longer than the product) and
 * runs its fast path only when neither operand is transposed (~25x slower otherwise). Shapes
 * our loops do not take (columns not a multiple of 8, batch shapes broadcast other than from
 * 1) go to wasm's kernel, after transposing any transposed operand explicitly (one copy).
 */
function batchMatMulWith(original: tf.KernelFunc) {
  return ({ inputs, backend, attrs }: KernelCall): TensorInfo => {
    const { transposeA, transposeB } = attrs as { transposeA: boolean; transposeB: boolean };
    const { a, b } = inputs as { a: TensorInfo; b: TensorInfo };
    const [ra, rb] = [a.shape.length, b.shape.length];
    const m = a.shape[transposeA ? ra - 1 : ra - 2] as number;
    const k = a.shape[transposeA ? ra - 2 : ra - 1] as number;
    const n = b.shape[transposeB ? rb - 2 : rb - 1] as number;
    const batchA = a.shape.slice(0, -2);
    const batchB = b.shape.slice(0, -2);
    const batchShape = tf.backend_util.assertAndGetBroadcastShape(batchA, batchB);
    const batch = tf.util.sizeFromShape(batchShape);
    const [sizeA, sizeB] = [tf.util.sizeFromShape(batchA), tf.util.sizeFromShape(batchB)];
    const ours =
      a.dtype === "float32" &&
      b.dtype === "float32" &&
      n % 8 === 0 &&
      m * k * n > 0 &&
      (sizeA === batch || sizeA === 1) &&
      (sizeB === batch || sizeB === 1);
    const temporaries: TensorInfo[] = [];
    const transposed = (t: TensorInfo) => {
      const copy = transposeLastTwo(t, backend);
      temporaries.push(copy);
      return copy;
    };
    let out: TensorInfo;
    if (ours) {
      out = backend.makeOutput([...batchShape, m, n], "float32");
      const simd = simdOn(backend);
      const [pa, pb, pc] = [simd.address(a), simd.address(b), simd.address(out)];
      const [sai, sal] = transposeA ? [4, 4 * m] : [4 * k, 4];
      const [sbl, sbj] = transposeB ? [4, 4 * k] : [4 * n, 4];
      simd.withScratch(256 * 8 * 4, (packed) => {
        for (let i = 0; i < batch; i++) {
          simd.matmul(
            pa + (sizeA === 1 ? 0 : i * 4 * m * k),
            pb + (sizeB === 1 ? 0 : i * 4 * k * n),
            pc + i * 4 * m * n,
            m,
            k,
            n,
            sai,
            sal,
            sbl,
            sbj,
            packed,
          );
        }
      });
    } else if (transposeA || transposeB) {
      out = original({
        inputs: { a: transposeA ? transposed(a) : a, b: transposeB ? transposed(b) : b },
        backend,
        attrs: { ...attrs, transposeA: false, transposeB: false },
      } as never) as TensorInfo;
    } else {
      out = original({ inputs, backend, attrs } as never) as TensorInfo;
    }
    for (const t of temporaries) backend.disposeData(t.dataId);
    return out;
  };
}

/**
 * The filter gradient of a 2-D convolution (NHWC), which the wasm backend lacks: the input's
 * patches laid out as columns, cols[k][n] for k = (kh, kw, ci) and n = (b, oh, ow), then
 * dW = cols x dy, one BatchMatMul (batchMatMulWith). (Measured slower on the CNN of
 * bench/speed.ts: patches as rows with a transposed product, 1.3x; dW^T = dy^T x cols, 2.3x; a
 * convolution of x by dy on wasm's Conv2D, 2.8x on the first layer, equal on the second.)
 */
function conv2DBackpropFilter({ inputs, backend, attrs }: KernelCall): TensorInfo {
  const { x, dy } = inputs as { x: TensorInfo; dy: TensorInfo };
  const { strides, pad, dimRoundingMode, filterShape } = attrs as unknown as tf.Conv2DBackpropFilterAttrs;
  if ((attrs.dataFormat ?? "NHWC") !== "NHWC") throw new Error("Conv2DBackpropFilter on wasm: NHWC only");
  const info = tf.backend_util.computeConv2DInfo(
    x.shape as [number, number, number, number],
    filterShape,
    strides,
    1,
    pad,
    dimRoundingMode,
  );
  const { batchSize, inChannels, outHeight, outWidth, outChannels, filterHeight, filterWidth } = info;
  const k = filterHeight * filterWidth * inChannels;
  const n = batchSize * outHeight * outWidth;
  // Channel-major first, so that each row of cols copies from one contiguous plane.
  const xt = run("Transpose", { x }, backend, { perm: [3, 0, 1, 2] });
  const colsInfo = backend.makeOutput([1, k, n], "float32");
  const simd = simdOn(backend);
  simd.patches(simd.address(xt), simd.address(colsInfo), ...windowOf(info));
  backend.disposeData(xt.dataId);
  const dy3 = run("Reshape", { x: dy }, backend, { shape: [1, n, outChannels] });
  const product = run("BatchMatMul", { a: colsInfo, b: dy3 }, backend, {
    transposeA: false,
    transposeB: false,
  });
  const dw = run("Reshape", { x: product }, backend, {
    shape: [filterHeight, filterWidth, inChannels, outChannels],
  });
  for (const t of [colsInfo, dy3, product]) backend.disposeData(t.dataId);
  return dw;
}

/**
 * dy with (stride - 1) zeros between its rows and between its columns: [b, (oh-1)*sh+1,
 * (ow-1)*sw+1, c]. A strided convolution's input gradient is then a stride-1 one.
 */
function dilate(dy: TensorInfo, strideH: number, strideW: number, backend: BackendWasm): TensorInfo {
  const [batch, outH, outW, channels] = dy.shape as [number, number, number, number];
  const [h, w] = [(outH - 1) * strideH + 1, (outW - 1) * strideW + 1];
  const out = backend.makeOutput([batch, h, w, channels], "float32");
  const dst = backend.typedArrayFromHeap(out) as Float32Array;
  const src = backend.typedArrayFromHeap(dy) as Float32Array;
  dst.fill(0);
  for (let b = 0, from = 0; b < batch; b++) {
    for (let oh = 0; oh < outH; oh++) {
      for (let ow = 0; ow < outW; ow++, from += channels) {
        const to = ((b * h + oh * strideH) * w + ow * strideW) * channels;
        for (let c = 0; c < channels; c++) dst[to + c] = src[from + c] as number;
      }
    }
  }
  return out;
}

/**
 * The input gradient of a convolution as a stride-1 convolution, on wasm's fast Conv2D, of dy
 * (dilated by the stride) with the filter rotated by 180 degrees and its channel axes swapped:
 * dx[i] = sum over f of dy'[i + top - f] * w[f], so dy' is padded by (k - 1 - top) before and
 * by what makes the output as long as x after. wasm's own kernel (5x slower on ResNet-20's
 * stride-2 layers) where that padding would be negative.
 */
function conv2DBackpropInputWith(original: tf.KernelFunc) {
  return ({ inputs, backend, attrs }: KernelCall): TensorInfo => {
    const { dy, filter } = inputs as { dy: TensorInfo; filter: TensorInfo };
    const { strides, pad, dimRoundingMode, inputShape } = attrs as unknown as tf.Conv2DBackpropInputAttrs;
    const info = tf.backend_util.computeConv2DInfo(
      inputShape,
      filter.shape as [number, number, number, number],
      strides,
      1,
      pad,
      dimRoundingMode,
    );
    const { filterHeight: kh, filterWidth: kw, strideHeight: sh, strideWidth: sw, padInfo } = info;
    const [dh, dw] = [(info.outHeight - 1) * sh + 1, (info.outWidth - 1) * sw + 1];
    const after = [info.inHeight - dh + padInfo.top, info.inWidth - dw + padInfo.left];
    if ((attrs.dataFormat ?? "NHWC") !== "NHWC" || after.some((p) => p < 0)) {
      return original({ inputs, backend, attrs } as never) as TensorInfo;
    }
    const dilated = sh === 1 && sw === 1 ? dy : dilate(dy, sh, sw, backend);
    const reversed = run("Reverse", { x: filter }, backend, { dims: [0, 1] });
    const flipped = run("Transpose", { x: reversed }, backend, { perm: [0, 1, 3, 2] });
    const dx = run("Conv2D", { x: dilated, filter: flipped }, backend, {
      strides: 1,
      dilations: 1,
      dataFormat: "NHWC",
      pad: [
        [0, 0],
        [kh - 1 - padInfo.top, after[0]],
        [kw - 1 - padInfo.left, after[1]],
        [0, 0],
      ],
    });
    for (const t of [reversed, flipped, ...(dilated === dy ? [] : [dilated])]) backend.disposeData(t.dataId);
    return dx;
  };
}

/** Tile (float32) as block copies; wasm's kernel computes every element's index the slow way. */
function tileWith(original: tf.KernelFunc) {
  return ({ inputs, backend, attrs }: KernelCall): TensorInfo => {
    const x = inputs.x as TensorInfo;
    const reps = attrs.reps as number[];
    const rank = x.shape.length;
    if (x.dtype !== "float32" || rank === 0)
      return original({ inputs, backend, attrs } as never) as TensorInfo;
    const inShape = x.shape;
    const outShape = inShape.map((d, i) => d * (reps[i] ?? 1));
    const out = backend.makeOutput(outShape, "float32");
    // Views after makeOutput: growing the wasm memory detaches older views.
    const src = backend.typedArrayFromHeap(x) as Float32Array;
    const dst = backend.typedArrayFromHeap(out) as Float32Array;
    const last = inShape[rank - 1] as number;
    const outLast = outShape[rank - 1] as number;
    if (inShape.slice(0, -1).every((d) => d === 1)) {
      // One row repeated (BatchNorm's broadcasts): write it once, then double the filled part.
      for (let k = 0; k < outLast; k++) dst[k] = src[k % last] as number;
      for (let filled = outLast; filled < dst.length; filled *= 2) {
        dst.copyWithin(filled, 0, Math.min(filled, dst.length - filled));
      }
      return out;
    }
    const index = new Array<number>(rank - 1).fill(0);
    for (let d = 0; d < dst.length; d += outLast) {
      let s = 0;
      for (let a = 0; a < rank - 1; a++)
        s = s * (inShape[a] as number) + ((index[a] as number) % (inShape[a] as number));
      s *= last;
      if (outLast === last) dst.set(src.subarray(s, s + last), d);
      else for (let k = 0; k < outLast; k++) dst[d + k] = src[s + (k % last)] as number;
      for (let a = rank - 2; a >= 0; a--) {
        index[a] = (index[a] as number) + 1;
        if ((index[a] as number) < (outShape[a] as number)) break;
        index[a] = 0;
      }
    }
    return out;
  };
}

/**
 * Sum and Mean over leading axes (float32), as BatchNorm's statistics and gradients and bias
 * gradients reduce: blocks of rows, one float64 accumulator per column. wasm's own kernels
 * transpose the input first (2x slower); a product with a row of ones on wasm's matmul measured
 * 3x slower still (it packs the whole input as weights).
 */
function reduceLeadingWith(original: tf.KernelFunc, mean: boolean) {
  return ({ inputs, backend, attrs }: KernelCall): TensorInfo => {
    const x = inputs.x as TensorInfo;
    const axes = tf.util.parseAxisParam(attrs.axis as number | number[], x.shape).sort((a, b) => a - b);
    const leading = axes.every((axis, i) => axis === i) && axes.length > 0 && axes.length < x.shape.length;
    if (x.dtype !== "float32" || !leading) return original({ inputs, backend, attrs } as never) as TensorInfo;
    const kept = x.shape.slice(axes.length);
    const outShape = attrs.keepDims ? [...axes.map(() => 1), ...kept] : kept;
    const inner = tf.util.sizeFromShape(kept);
    const rows = tf.util.sizeFromShape(x.shape) / inner;
    const out = backend.makeOutput(outShape, "float32");
    const src = backend.typedArrayFromHeap(x) as Float32Array;
    const dst = backend.typedArrayFromHeap(out) as Float32Array;
    const BLOCK = 256; // rows per block: a block stays in cache while each column is summed
    const sums = new Float64Array(inner);
    for (let r0 = 0; r0 < rows; r0 += BLOCK) {
      const end = Math.min(rows, r0 + BLOCK) * inner;
      for (let c = 0; c < inner; c++) {
        let acc = 0;
        for (let o = r0 * inner + c; o < end; o += inner) acc += src[o] as number;
        sums[c] = (sums[c] as number) + acc;
      }
    }
    for (let c = 0; c < inner; c++) dst[c] = mean ? (sums[c] as number) / rows : (sums[c] as number);
    return out;
  };
}

/** MaxPoolGrad's loops for any channel count, one channel at a time (channels are contiguous). */
function maxPoolGradByChannel(
  dy: TensorInfo,
  input: TensorInfo,
  info: tf.backend_util.Conv2DInfo,
  backend: BackendWasm,
): TensorInfo {
  const { batchSize, inHeight, inWidth, inChannels: channels, outHeight, outWidth } = info;
  const { filterHeight, filterWidth, strideHeight, strideWidth, padInfo } = info;
  const out = backend.makeOutput(input.shape, "float32");
  const dx = backend.typedArrayFromHeap(out) as Float32Array;
  dx.fill(0);
  const xs = backend.typedArrayFromHeap(input) as Float32Array;
  const dys = backend.typedArrayFromHeap(dy) as Float32Array;
  const max = new Float32Array(channels);
  const best = new Int32Array(channels);
  for (let b = 0; b < batchSize; b++) {
    for (let oh = 0; oh < outHeight; oh++) {
      const h0 = oh * strideHeight - padInfo.top;
      for (let ow = 0; ow < outWidth; ow++) {
        const w0 = ow * strideWidth - padInfo.left;
        max.fill(Number.NEGATIVE_INFINITY);
        best.fill(-1);
        for (let fh = Math.max(0, -h0); fh < filterHeight && h0 + fh < inHeight; fh++) {
          for (let fw = Math.max(0, -w0); fw < filterWidth && w0 + fw < inWidth; fw++) {
            const i = ((b * inHeight + h0 + fh) * inWidth + w0 + fw) * channels;
            for (let c = 0; c < channels; c++) {
              const v = xs[i + c] as number;
              if (v > (max[c] as number)) {
                max[c] = v;
                best[c] = i + c;
              }
            }
          }
        }
        const o = ((b * outHeight + oh) * outWidth + ow) * channels;
        for (let c = 0; c < channels; c++) {
          const at = best[c] as number;
          if (at >= 0) dx[at] = (dx[at] as number) + (dys[o + c] as number);
        }
      }
    }
  }
  return out;
}

/**
 * MaxPoolGrad (float32, NHWC): dy goes to the first maximum of each window; four channels at a
 * time in simd.wat when the channels are a multiple of 4, else one at a time here. (wasm's own
 * kernel is slow, and misses windows: it disagrees with the cpu backend.)
 */
function maxPoolGrad({ inputs, backend, attrs }: KernelCall): TensorInfo {
  const { dy, input } = inputs as { dy: TensorInfo; input: TensorInfo };
  const { filterSize, strides, pad, dimRoundingMode } = attrs as unknown as tf.MaxPoolGradAttrs;
  const info = tf.backend_util.computePool2DInfo(
    input.shape as [number, number, number, number],
    filterSize,
    strides,
    1,
    pad,
    dimRoundingMode,
  );
  if (info.inChannels % 4 !== 0) return maxPoolGradByChannel(dy, input, info, backend);
  const out = backend.makeOutput(input.shape, "float32");
  (backend.typedArrayFromHeap(out) as Float32Array).fill(0);
  const simd = simdOn(backend);
  simd.max_pool_grad(simd.address(input), simd.address(dy), simd.address(out), ...windowOf(info));
  return out;
}

/**
 * Identity shares its input's memory, as the cpu backend's and wasm's own Reshape do; wasm's
 * Identity copies it. TF.js runs Identity for every tensor an op keeps for its gradient, so in
 * a training step it copied most activations once more.
 */
function identityWith(original: tf.KernelFunc) {
  return ({ inputs, backend, attrs }: KernelCall): TensorInfo => {
    const x = inputs.x as TensorInfo;
    if (x.dtype === "string") return original({ inputs, backend, attrs } as never) as TensorInfo;
    backend.incRef(x.dataId);
    return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
  };
}

/** One SGD step of one parameter in one pass (optimizer.ts's SGD_STEP_KERNEL). */
function sgdStep({ inputs, backend, attrs }: KernelCall): TensorInfo[] {
  const { p, g, buf } = inputs as { p: TensorInfo; g: TensorInfo; buf: TensorInfo };
  const { lr, momentum, weightDecay, nesterov } = attrs as {
    lr: number;
    momentum: number;
    weightDecay: number;
    nesterov: boolean;
  };
  const count = tf.util.sizeFromShape(p.shape);
  if (count % 4 !== 0 || p.dtype !== "float32")
    throw new Error(`${SGD_STEP_KERNEL}: float32, size a multiple of 4`);
  const [next, nextBuf] = [backend.makeOutput(p.shape, "float32"), backend.makeOutput(p.shape, "float32")];
  const simd = simdOn(backend);
  simd.sgd_step(
    simd.address(p),
    simd.address(g),
    simd.address(buf),
    simd.address(next),
    simd.address(nextBuf),
    count,
    lr,
    momentum,
    weightDecay,
    nesterov ? 1 : 0,
    nesterov ? momentum : 1,
  );
  return [next, nextBuf];
}

let registered = false;

/**
 * Registers our wasm kernels through TensorFlow.js's kernel registry, where the wasm backend
 * lacks one (Conv2DBackpropFilter: conv nets could not train) or where profiling a training step
 * showed it slow (BatchMatMul, Conv2DBackpropInput, Tile, leading-axis Sum and Mean,
 * MaxPoolGrad, Identity, batch normalisation in training and inference: batch-norm.ts, and the
 * SGD step, eight ops where one pass does). Call after the wasm backend's package is imported;
 * idempotent.
 */
export function registerWasmKernels(): void {
  if (registered) return;
  const replace = (name: string, wrap: (original: tf.KernelFunc) => unknown) => {
    const original = tf.getKernel(name, "wasm");
    if (!original) throw new Error(`the wasm backend has no ${name} kernel`);
    tf.unregisterKernel(name, "wasm");
    tf.registerKernel({ ...original, kernelFunc: wrap(original.kernelFunc) as tf.KernelFunc });
  };
  replace("BatchMatMul", batchMatMulWith);
  replace("Conv2DBackpropInput", conv2DBackpropInputWith);
  replace("Tile", tileWith);
  replace("Sum", (original) => reduceLeadingWith(original, false));
  replace("Mean", (original) => reduceLeadingWith(original, true));
  replace("MaxPoolGrad", () => maxPoolGrad);
  replace("Identity", identityWith);
  replace("FusedBatchNorm", batchNormInferenceWith);
  tf.registerKernel({ kernelName: SGD_STEP_KERNEL, backendName: "wasm", kernelFunc: sgdStep as never });
  tf.registerKernel({
    kernelName: "Conv2DBackpropFilter",
    backendName: "wasm",
    kernelFunc: conv2DBackpropFilter as never,
  });
  registerBatchNormKernels();
  registered = true;
}
