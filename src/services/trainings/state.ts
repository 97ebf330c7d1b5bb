import { Readable } from "node:stream";
import type { TrainingState } from "../../ml/population.js";
import { encodeSafetensorsHeader } from "../../tensors/safetensors.js";
import { readBytes, readSafetensorsHeader, storeSource } from "../../tensors/source.js";
import type { StoreContext } from "../context.js";
import { jobScratchPrefix } from "../jobs/lifecycle.js";

/** Where a training job keeps its last completed epoch, for a retried attempt to resume from. */
export function trainingStateKey(job: { tenantId: string; id: string }): string {
  return `${jobScratchPrefix(job)}training-state.safetensors`;
}

/** Saves the state as one safetensors file (tensors `m<j>/w<i>`, `m<j>/first<i>`, `m<j>/second<i>`). */
export async function saveTrainingState(ctx: StoreContext, key: string, state: TrainingState): Promise<void> {
  const tensors: { name: string; data: Float32Array }[] = state.members.flatMap((m, j) => [
    ...m.weights.map((data, i) => ({ name: `m${j}/w${i}`, data })),
    ...m.optimizer.first.map((data, i) => ({ name: `m${j}/first${i}`, data })),
    ...m.optimizer.second.map((data, i) => ({ name: `m${j}/second${i}`, data })),
  ]);
  const counts = state.members.map((m) => ({
    weights: m.weights.length,
    first: m.optimizer.first.length,
    second: m.optimizer.second.length,
    steps: m.optimizer.steps,
  }));
  const { bytes } = encodeSafetensorsHeader(
    tensors.map((t) => ({ name: t.name, dtype: "F32", shape: [t.data.length] })),
    { epochs: String(state.epochs), step: String(state.step), members: JSON.stringify(counts) },
  );
  const data = tensors.map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength));
  await ctx.store.put(key, Readable.from([Buffer.concat([bytes, ...data])]));
}

/** The saved state, or null when there is none. */
export async function loadTrainingState(ctx: StoreContext, key: string): Promise<TrainingState | null> {
  const stat = await ctx.store.stat(key);
  if (!stat) return null;
  const source = storeSource(ctx.store, key, stat.sizeBytes);
  const header = await readSafetensorsHeader(source, ctx.limits.maxSafetensorsHeaderBytes);
  const byName = new Map(header.tensors.map((t) => [t.name, t]));
  const read = async (name: string): Promise<Float32Array> => {
    const t = byName.get(name);
    if (!t) throw new Error(`training state lacks ${name}`);
    const bytes = await readBytes(source, header.dataStart + t.begin, t.end - t.begin);
    return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  };
  const meta = header.metadata ?? {};
  const counts = JSON.parse(meta.members ?? "[]") as {
    weights: number;
    first: number;
    second: number;
    steps: number;
  }[];
  const members = [];
  for (const [j, c] of counts.entries()) {
    const list = async (kind: string, n: number) =>
      Promise.all(Array.from({ length: n }, (_, i) => read(`m${j}/${kind}${i}`)));
    members.push({
      weights: await list("w", c.weights),
      optimizer: {
        steps: c.steps,
        first: await list("first", c.first),
        second: await list("second", c.second),
      },
    });
  }
  return { epochs: Number(meta.epochs), step: Number(meta.step), members };
}
