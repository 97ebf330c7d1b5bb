import { blockElementsFor, runMerge, slotCount } from "../../merge/engine.js";
import type { MergePool } from "../../merge/pool.js";
import { planMergeOffThread } from "../../merge/preflight.js";
import type { SafetensorsSummary } from "../../tensors/safetensors.js";
import { storeSource } from "../../tensors/source.js";
import { createOutput, type OutputWriter, outputRow } from "../checkpoints/outputs.js";
import type { MergeAttempt, MergeOutputs } from "./merge-job.js";
import { planArguments, preflight } from "./merges.js";

/** The streamed merge of the bytes (any safetensors checkpoints), on the worker's merge threads. */
export async function streamedMerge(a: MergeAttempt, pool: MergePool): Promise<MergeOutputs> {
  const { ctx, job, params, inputs, ids } = a;
  const blockElements = blockElementsFor(inputs.length, ids.length, slotCount(pool.size));
  const plan = await preflight(() =>
    planMergeOffThread(...planArguments(ctx, params, inputs, a.coefficients, blockElements)),
  );
  const outputs: OutputWriter[] = [];
  let summaries: SafetensorsSummary[];
  try {
    for (const id of ids) outputs.push(await createOutput(ctx, job.tenantId, id));
    await runMerge({
      plan,
      sources: inputs.map((c) => storeSource(ctx.store, c.storageKey, c.sizeBytes)),
      sinks: outputs,
      pool,
      signal: a.signal,
      onProgress: (done, total) => a.progress(total === 0 ? 1 : done / total),
    });
    summaries = await Promise.all(outputs.map((o) => o.commit()));
  } catch (err) {
    await Promise.allSettled(outputs.map((o) => o.abort()));
    throw err;
  }
  return {
    rows: ids.map((id, j) =>
      outputRow({
        id,
        tenantId: job.tenantId,
        name: a.names[j] as string,
        jobId: job.id,
        summary: summaries[j] as SafetensorsSummary,
      }),
    ),
    accuracies: null,
  };
}
