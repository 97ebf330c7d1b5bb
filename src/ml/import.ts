import * as tf from "@tensorflow/tfjs";
import type { SafetensorsHeader } from "../tensors/safetensors.js";
import { type ByteSource, readBytes } from "../tensors/source.js";
import { namedWeights } from "./models.js";

/** A checkpoint that cannot become a TF.js model: its topology or weights are wrong, and stay wrong. */
export class CheckpointImportError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CheckpointImportError";
  }
}

/**
 * Rebuilds a TF.js model from a checkpoint this service trained: the stored topology, then every
 * weight by name (`loadWeights`). Throws `CheckpointImportError` for a topology TF.js cannot
 * build, or naming the first weight that is missing or has another shape.
 */
export async function modelFromCheckpoint(
  topology: { modelTopology: unknown },
  source: ByteSource,
  header: SafetensorsHeader,
): Promise<tf.LayersModel> {
  const model = await tf.models
    .modelFromJSON({ modelTopology: topology.modelTopology } as tf.io.ModelJSON)
    .catch((err: unknown) => {
      throw new CheckpointImportError(
        `the checkpoint's TF.js topology cannot be built: ${(err as Error).message}`,
      );
    });
  try {
    await loadWeights(model, source, header);
  } catch (err) {
    model.dispose();
    throw err;
  }
  return model;
}

/**
 * Writes every weight of `model` by name from a safetensors file (F32), naming the first weight
 * that is missing or has another shape (`CheckpointImportError`).
 */
export async function loadWeights(
  model: tf.LayersModel,
  source: ByteSource,
  header: SafetensorsHeader,
): Promise<void> {
  const byName = new Map(header.tensors.map((t) => [t.name, t]));
  for (const { name, variable } of namedWeights(model)) {
    const t = byName.get(name);
    if (t?.dtype !== "F32" || t.shape.join(",") !== variable.shape.join(",")) {
      throw new CheckpointImportError(
        `weight ${name} is missing from the checkpoint or is not F32 [${variable.shape}]`,
      );
    }
    const bytes = await readBytes(source, header.dataStart + t.begin, t.end - t.begin);
    const values = tf.tensor(new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4), t.shape);
    variable.write(values);
    values.dispose();
  }
}
