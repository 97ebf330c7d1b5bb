import * as tf from "@tensorflow/tfjs";
import { registerWasmKernels } from "./wasm-kernels.js";

export type BackendName = "tensorflow" | "wasm" | "cpu";
export const BACKENDS: BackendName[] = ["tensorflow", "wasm", "cpu"];

let selected: BackendName | null = null;

/** The backend this process trains on, once `selectBackend` has run; null before. */
export function activeBackend(): BackendName | null {
  return selected;
}

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
 */
export async function selectBackend(
  options: { forced?: BackendName | undefined } = {},
): Promise<BackendName> {
  const { forced } = options;
  if (forced) {
    if (!(await load(forced))) throw new BackendError(`the ${forced} backend could not be loaded`);
    await tf.ready();
    selected = forced;
    return forced;
  }
  for (const name of BACKENDS) {
    if (await load(name)) {
      await tf.ready();
      selected = name;
      return name;
    }
  }
  throw new BackendError("no TensorFlow.js backend could be loaded");
}
