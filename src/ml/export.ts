import type * as tf from "@tensorflow/tfjs";
import { encodeSafetensorsHeader } from "../tensors/safetensors.js";
import { namedWeights } from "./models.js";

/** What a checkpoint needs to be served as a TF.js layers model: the topology and the weight order. */
export interface TfjsTopology {
  modelTopology: unknown;
  weights: { name: string; shape: number[]; dtype: "float32" }[];
}

/**
 * A model's weights as safetensors (F32, tensors in `namedWeights` order, so the data section is
 * exactly the TF.js weights file) and its topology.
 */
export function modelToSafetensors(
  model: tf.LayersModel,
  metadata: Record<string, string>,
): { bytes: Buffer; topology: TfjsTopology } {
  const weights = namedWeights(model);
  const { bytes: header } = encodeSafetensorsHeader(
    weights.map((w) => ({ name: w.name, dtype: "F32", shape: w.variable.shape as number[] })),
    metadata,
  );
  const data = weights.map((w) => {
    const values = w.variable.read().dataSync() as Float32Array;
    return Buffer.from(values.buffer, values.byteOffset, values.byteLength);
  });
  return {
    bytes: Buffer.concat([header, ...data]),
    topology: {
      modelTopology: model.toJSON(undefined, false),
      weights: weights.map((w) => ({ name: w.name, shape: w.variable.shape as number[], dtype: "float32" })),
    },
  };
}
