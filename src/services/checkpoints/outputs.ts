import type { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { schema } from "../../db/client.js";
import { type SafetensorsSummary, SafetensorsValidator } from "../../tensors/safetensors.js";
import type { StoreContext } from "../context.js";
import { checkpointKey } from "./checkpoints.js";

/**
 * Writes a job's output to the store at the key of `id`, through the same strict validator as
 * uploads; resolves with what the validator learned (size, sha256, counts).
 */
export async function storeOutput(
  ctx: StoreContext,
  tenantId: string,
  id: string,
  body: Readable,
): Promise<SafetensorsSummary> {
  const validator = new SafetensorsValidator({ maxHeaderBytes: ctx.limits.maxSafetensorsHeaderBytes });
  await Promise.all([pipeline(body, validator), ctx.store.put(checkpointKey(tenantId, id), validator)]);
  return validator.summary();
}

/** The checkpoints row of an object validated into `summary` (a job output, or a completed upload session). */
export function outputRow(o: {
  id: string;
  tenantId: string;
  name: string;
  jobId: string | null;
  summary: SafetensorsSummary;
  topology?: unknown;
}): typeof schema.checkpoints.$inferInsert {
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
