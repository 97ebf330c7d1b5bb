import type * as tf from "@tensorflow/tfjs";
import type { BackendWasm } from "@tensorflow/tfjs-backend-wasm";
import { SIMD_WASM } from "../generated/simd.js";

/** What TF.js passes a kernel of the wasm backend. */
export interface KernelCall {
  inputs: Record<string, tf.TensorInfo>;
  backend: BackendWasm;
  attrs: Record<string, unknown>;
}

/** A 2-D window's geometry (NHWC input, filter, stride, padding, output), as simd.wat's loops take it. */
type Window = [
  batch: number,
  height: number,
  width: number,
  channels: number,
  filterH: number,
  filterW: number,
  strideH: number,
  strideW: number,
  padTop: number,
  padLeft: number,
  outH: number,
  outW: number,
];

/** The window of a convolution or pooling, from TF.js's description of it. */
export function windowOf(info: tf.backend_util.Conv2DInfo): Window {
  return [
    info.batchSize,
    info.inHeight,
    info.inWidth,
    info.inChannels,
    info.filterHeight,
    info.filterWidth,
    info.strideHeight,
    info.strideWidth,
    info.padInfo.top,
    info.padInfo.left,
    info.outHeight,
    info.outWidth,
  ];
}

/** The loops of simd.wat; pointers are byte offsets in the backend's memory. */
interface SimdExports {
  channel_sums(u: number, v: number, rows: number, channels: number, sums: number): void;
  affine(x: number, y: number, count: number, channels: number, scale: number, shift: number): void;
  patches(xt: number, cols: number, ...window: Window): void;
  max_pool_grad(x: number, dy: number, dx: number, ...window: Window): void;
  matmul(
    a: number,
    b: number,
    c: number,
    m: number,
    k: number,
    n: number,
    sai: number,
    sal: number,
    sbl: number,
    sbj: number,
    packed: number,
  ): void;
  sgd_step(
    p: number,
    g: number,
    buf: number,
    pOut: number,
    bufOut: number,
    count: number,
    lr: number,
    mu: number,
    wd: number,
    kd: number,
    kb: number,
  ): void;
  affine2(
    u: number,
    v: number,
    out: number,
    count: number,
    channels: number,
    a: number,
    b: number,
    k: number,
  ): void;
}

/** The WebAssembly API as used here (the project's Node typings do not declare it). */
interface Memory {
  readonly buffer: ArrayBuffer;
}
const WebAssemblyApi = (
  globalThis as unknown as {
    WebAssembly: {
      Module: new (bytes: Uint8Array) => object;
      Instance: new (module: object, imports: object) => { exports: unknown };
    };
  }
).WebAssembly;

/** What our kernels use of the backend's emscripten module (not in its typings). */
interface WasmModule {
  asm: { memory: Memory };
  _malloc(bytes: number): number;
  _free(pointer: number): void;
}

let compiled: object | null = null;
const instances = new WeakMap<Memory, SimdExports>();

/**
 * simd.wat's loops instantiated on `backend`'s memory, with the helpers they need: tensors'
 * addresses, and scratch space in the same memory for per-channel coefficients.
 */
export function simdOn(backend: BackendWasm) {
  const module = backend.wasm as unknown as WasmModule;
  const memory = module.asm?.memory;
  if (!memory || !module._malloc || !module._free) {
    throw new Error("this @tensorflow/tfjs-backend-wasm does not expose its memory, which our kernels need");
  }
  let loops = instances.get(memory);
  if (!loops) {
    compiled ??= new WebAssemblyApi.Module(Buffer.from(SIMD_WASM, "base64"));
    loops = new WebAssemblyApi.Instance(compiled, { env: { memory } }).exports as unknown as SimdExports;
    instances.set(memory, loops);
  }
  return {
    ...loops,
    address: (t: tf.TensorInfo) => backend.dataIdMap.get(t.dataId)?.memoryOffset as number,
    /**
     * Runs `f` with `bytes` of scratch memory (8-byte aligned) at `pointer`, then frees it.
     * `f` takes its views of the memory itself: allocating may have grown (detached) it.
     */
    withScratch<T>(bytes: number, f: (pointer: number, buffer: ArrayBuffer) => T): T {
      const pointer = module._malloc(bytes);
      try {
        return f(pointer, memory.buffer);
      } finally {
        module._free(pointer);
      }
    },
  };
}
