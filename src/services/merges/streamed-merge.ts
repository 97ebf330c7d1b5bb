import { blockElementsFor, runMerge, slotCount, streamSink } from "../../merge/engine.js";
import type { MergePool } from "../../merge/pool.js";
import { planMergeOffThread } from "../../merge/preflight.js";
import type { SafetensorsSummary } from "../../tensors/safetensors.js";
import { storeSource } from "../../tensors/source.js";
import { outputRow, storeOutput } from "../checkpoints/outputs.js";
import type { MergeAttempt, MergeOutputs } from "./merge-job.js";
import { planArguments, preflight } from "./merges.js";

/** The streamed merge of the bytes (any safetensors checkpoints), on the worker's merge threads. */
export async function streamedMerge(a: MergeAttempt, pool: MergePool): Promise<MergeOutputs> {
  const { ctx, job, params, inputs, ids } = a;
  const blockElements = blockElementsFor(inputs.length, ids.length, slotCount(pool));
  const plan = await preflight(() =>
    planMergeOffThread(...planArguments(ctx, params, inputs, a.coefficients, blockElements)),
  );
  const sinks = ids.map(() => streamSink());
  const abort = new AbortController();
  a.signal.addEventListener("abort", () => abort.abort(a.signal.reason));
  const stored = sinks.map((sink, j) => {
    const done = storeOutput(ctx, job.tenantId, ids[j] as string, sink.stream);
    done.catch((err: unknown) => abort.abort(err));
    return done;
  });
  let summaries: SafetensorsSummary[];
  try {
    await runMerge({
      plan,
      sources: inputs.map((c) => storeSource(ctx.store, c.storageKey, c.sizeBytes)),
      sinks,
      pool,
      signal: abort.signal,
      onProgress: (done, total) => a.progress(total === 0 ? 1 : done / total),
    });
    for (const sink of sinks) sink.stream.end();
    summaries = await Promise.all(stored);
  } catch (err) {
    for (const sink of sinks) sink.stream.destroy(err as Error);
    await Promise.allSettled(stored);
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
