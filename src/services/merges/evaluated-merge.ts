import { runTfjsTask, type TfjsOptions, tfjsEnvironment } from "../../jobs/tfjs-process.js";
import { type DatasetSource, datasetSource } from "../datasets/datasets.js";
import type { MergeAttempt, MergeOutputs } from "./merge-job.js";
import type { MergeParams } from "./merges.js";

/**
 * The evaluated merge of models this service trained, in a process of its own
 * (`runEvaluationTask`), which stores its outputs.
 */
export async function evaluatedMerge(a: MergeAttempt, options: TfjsOptions): Promise<MergeOutputs> {
  const { ctx, job, params, inputs, coefficients, ids, names } = a;
  const evaluation = params.evaluate;
  if (!evaluation) throw new Error("not an evaluated merge");
  const task: EvaluationTask = {
    job: { id: job.id, tenantId: job.tenantId },
    params,
    inputs: inputs.map((c) => ({ storageKey: c.storageKey, sizeBytes: c.sizeBytes, topology: c.topology })),
    coefficients,
    ids,
    names,
    source: await datasetSource({ ctx, principal: job, input: { dataset: evaluation.dataset } }),
  };
  return runTfjsTask<MergeOutputs>({ kind: "evaluate-merge", input: task }, tfjsEnvironment(ctx, options), {
    signal: a.signal,
    onProgress: a.progress,
  });
}

/** An evaluated merge's work, for the process that runs it (`evaluation-task.ts`). */
export interface EvaluationTask {
  job: { id: string; tenantId: string };
  params: MergeParams;
  inputs: { storageKey: string; sizeBytes: number; topology: unknown }[];
  coefficients: number[][];
  /** The outputs' checkpoint ids and names. */
  ids: string[];
  names: string[];
  source: DatasetSource;
}
