import { SafetensorsCheck, type SafetensorsSummary } from "../../tensors/safetensors.js";
import type { StoreContext } from "../context.js";
import { checkpointKey } from "./checkpoints.js";
import type { NewCheckpoint } from "./registry.js";

/** A job's output being written to the store (`ObjectWriter`), its summary at `commit`. */
export interface OutputWriter {
  write(data: Uint8Array): Promise<void>;
  commit(): Promise<SafetensorsSummary>;
  abort(): Promise<void>;
}

/**
 * Starts writing a job's output to the store at the key of `id`: each write passes the same
 * strict check as uploads, and is hashed, on its way; `commit` makes the object visible once
 * the bytes made a whole valid file, and returns what the check learned (size, sha256, counts).
 */
export async function createOutput(ctx: StoreContext, tenantId: string, id: string): Promise<OutputWriter> {
  const check = new SafetensorsCheck({ maxHeaderBytes: ctx.limits.maxSafetensorsHeaderBytes });
  const writer = await ctx.store.create(checkpointKey(tenantId, id));
  return {
    write: async (data) => {
      await check.update(data);
      await writer.write(data);
    },
    commit: async () => {
      const summary = check.finish();
      await writer.commit();
      return summary;
    },
    abort: () => writer.abort(),
  };
}

/** Stores a job's output held whole in memory (`createOutput` with one write). */
export async function storeOutput(
  ctx: StoreContext,
  tenantId: string,
  id: string,
  bytes: Uint8Array,
): Promise<SafetensorsSummary> {
  const output = await createOutput(ctx, tenantId, id);
  try {
    await output.write(bytes);
    return await output.commit();
  } catch (err) {
    await output.abort();
    throw err;
  }
}

/** The checkpoints row of an object validated into `summary` (a job output, or a completed upload session). */
export function outputRow(o: {
  id: string;
  tenantId: string;
  name: string;
  jobId: string | null;
  summary: SafetensorsSummary;
  topology?: unknown;
}): NewCheckpoint {
  const s = o.summary;
  return {
    id: o.id,
    tenantId: o.tenantId,
    name: o.name,
    sizeBytes: s.sizeBytes,
    sha256: s.sha256,
    tensorCount: s.tensorCount,
    parameterCount: s.parameterCount,
    dtypes: s.dtypes,
    metadata: s.metadata,
    topology: o.topology ?? null,
    storageKey: checkpointKey(o.tenantId, o.id),
    jobId: o.jobId,
  };
}

/** Deletes a job's outputs from the store (after a failed or canceled attempt); missing ones are fine. */
export async function deleteOutputs(ctx: StoreContext, tenantId: string, ids: string[]): Promise<void> {
  await Promise.all(ids.map((id) => ctx.store.delete(checkpointKey(tenantId, id)).catch(() => undefined)));
}
