import * as tf from "@tensorflow/tfjs";
import { registerWasmKernels } from "./wasm-kernels.js";

export type BackendName = "tensorflow" | "wasm" | "cpu";
export const BACKENDS: BackendName[] = ["tensorflow", "wasm", "cpu"];

export class BackendError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BackendError";
  }
}

/** Native TensorFlow through tfjs-node-gpu, then tfjs-node (optional dependencies). */
async function loadNative(): Promise<boolean> {
  for (const pkg of ["@tensorflow/tfjs-node-gpu", "@tensorflow/tfjs-node"]) {
    try {
      await import(pkg);
      if (await tf.setBackend("tensorflow")) return true;
    } catch {
      // not installed, or its native library is missing: try the next one
    }
  }
  return false;
}

async function load(name: BackendName): Promise<boolean> {
  if (name === "tensorflow") return loadNative();
  if (name === "wasm") {
    await import("@tensorflow/tfjs-backend-wasm");
    registerWasmKernels();
  }
  return tf.setBackend(name).catch(() => false);
}

/**
 * Selects the TensorFlow.js backend: `forced` (PAPA_BACKEND) or it fails naming why; otherwise the
 * fastest that loads: native TensorFlow, then wasm (with our kernels, see wasm-kernels.ts), then cpu.
 * With `check`, it also runs a small computation on it (a worker's probe at start).
 */
export async function selectBackend(
  options: { forced?: BackendName | undefined; check?: boolean } = {},
): Promise<BackendName> {
  const { forced } = options;
  let selected: BackendName | undefined;
  if (forced) {
    if (!(await load(forced))) throw new BackendError(`the ${forced} backend could not be loaded`);
    selected = forced;
  } else {
    for (const name of BACKENDS) {
      if (await load(name)) {
        selected = name;
        break;
      }
    }
  }
  if (!selected) throw new BackendError("no TensorFlow.js backend could be loaded");
  await tf.ready();
  if (options.check) {
    const sum = tf.tidy(
      () =>
        tf
          .matMul(tf.ones([2, 2]), tf.ones([2, 2]))
          .sum()
          .dataSync()[0],
    );
    if (sum !== 8) throw new BackendError(`the ${selected} backend computes wrong results (${sum} for 8)`);
  }
  return selected;
}
