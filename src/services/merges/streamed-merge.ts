import { blockElementsFor, runMerge, slotCount } from "../../merge/engine.js";
import type { MergePool } from "../../merge/pool.js";
import { planMergeOffThread } from "../../merge/preflight.js";
import { concatSources } from "../../tensors/shards.js";
import { type StoredFiles, storedFiles, weightSources } from "../checkpoints/files.js";
import { createMergeOutput, type MergeOutputWriter, outputRow } from "../checkpoints/outputs.js";
import type { MergeAttempt, MergeOutputs } from "./merge-job.js";
import { planArguments, preflight } from "./merges.js";

/** The streamed merge of the bytes (any safetensors checkpoints), on the worker's merge threads. */
export async function streamedMerge(a: MergeAttempt, pool: MergePool): Promise<MergeOutputs> {
  const { ctx, job, params, inputs, ids } = a;
  const blockElements = blockElementsFor(inputs.length, ids.length, slotCount(pool.size));
  const plan = await preflight(() =>
    planMergeOffThread(...planArguments(ctx, params, inputs, a.coefficients, blockElements)),
  );
  const outputs: MergeOutputWriter[] = [];
  let written: Awaited<ReturnType<MergeOutputWriter["commit"]>>[];
  try {
    const stored = inputs.map(storedFiles);
    const first = stored[0] as StoredFiles;
    for (const id of ids) outputs.push(await createMergeOutput(ctx, job.tenantId, id, plan, first));
    await runMerge({
      plan,
      sources: stored.map((c) => concatSources(weightSources(ctx.store, c))),
      sinks: outputs,
      pool,
      signal: a.signal,
      onProgress: (done, total) => a.progress(total === 0 ? 1 : done / total),
    });
    written = await Promise.all(outputs.map((o) => o.commit()));
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
        ...(written[j] as (typeof written)[number]),
      }),
    ),
    accuracies: null,
  };
}
