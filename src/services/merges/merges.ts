import { and, eq, inArray } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";
import { derivedId } from "../../ids.js";
import type { QueuedJob } from "../../jobs/queue.js";
import { runTfjsTask, type TfjsOptions, TfjsTaskError, tfjsEnvironment } from "../../jobs/tfjs-process.js";
import { blockElementsFor, runMerge, slotCount, streamSink } from "../../merge/engine.js";
import { type MergeMethod, MergeSpecError, mergeCoefficients } from "../../merge/methods.js";
import { MergeInputError, type PlanOptions } from "../../merge/plan.js";
import { MergePool } from "../../merge/pool.js";
import {
  checkMergeOffThread,
  type HeaderLimits,
  HeadersTooLargeError,
  planMergeOffThread,
} from "../../merge/preflight.js";
import type { FloatDtype } from "../../tensors/floats.js";
import { SafetensorsError, type SafetensorsSummary } from "../../tensors/safetensors.js";
import { type ByteSource, storeSource } from "../../tensors/source.js";
import { outputRow, storeOutput } from "../checkpoints/outputs.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { type DatasetSource, datasetSource, describeDatasetRef } from "../datasets/datasets.js";
import { InvalidInputError, PayloadTooLargeError } from "../errors.js";
import {
  type AttemptOutcome,
  createJob,
  failAbandonedJob,
  type Job,
  type JobAttempt,
  type JobRules,
  runJobAttempt,
} from "../jobs/jobs.js";

/** A merge request as stored in the job's params (the API's field names). */
export interface MergeParams {
  method: MergeMethod["method"];
  inputs: string[];
  name?: string | undefined;
  seed?: number | undefined;
  coefficients?: number[] | undefined;
  beta?: number | undefined;
  exclude?: string[] | undefined;
  output_dtype?: FloatDtype | undefined;
  /** Re-estimate BatchNorm and measure test accuracy of every output (models this service trained). */
  evaluate?:
    | {
        dataset: string;
        max_train_examples?: number | undefined;
        max_test_examples?: number | undefined;
      }
    | undefined;
}

function methodOf(p: MergeParams): MergeMethod {
  switch (p.method) {
    case "papa-all":
      return { method: "papa-all" };
    case "papa-2":
      return { method: "papa-2", seed: p.seed ?? 0 };
    case "weighted":
      return { method: "weighted", coefficients: p.coefficients ?? [] };
    case "papa-pull":
      return { method: "papa-pull", beta: p.beta ?? 0.5 };
  }
}

type CheckpointRow = typeof schema.checkpoints.$inferSelect;

/** Why a merge cannot succeed however often it is retried. */
class PermanentMergeError extends Error {}

async function loadInputs(ctx: ServiceContext, tenantId: string, ids: string[]): Promise<CheckpointRow[]> {
  const rows = await ctx.db
    .select()
    .from(schema.checkpoints)
    .where(and(eq(schema.checkpoints.tenantId, tenantId), inArray(schema.checkpoints.id, ids)));
  const byId = new Map(rows.map((r) => [r.id, r]));
  return ids.map((id) => {
    const row = byId.get(id);
    if (!row) throw new InvalidInputError(`input checkpoint ${id} not found`);
    if (row.deletedAt) throw new InvalidInputError(`input checkpoint ${id} was deleted`);
    return row;
  });
}

/** What planning a merge of `inputs` takes: their bytes, the header limits, and the plan's options. */
function planArguments(
  ctx: ServiceContext,
  params: MergeParams,
  inputs: CheckpointRow[],
  blockElements: number,
): [ByteSource[], HeaderLimits, Omit<PlanOptions, "headers">] {
  return [
    inputs.map((c) => storeSource(ctx.store, c.storageKey, c.sizeBytes)),
    {
      maxHeaderBytes: ctx.limits.maxSafetensorsHeaderBytes,
      maxTotalHeaderBytes: ctx.limits.maxMergeHeaderBytes,
    },
    {
      coefficients: mergeCoefficients(methodOf(params), inputs.length),
      labels: inputs.map((c) => `checkpoint ${c.id}`),
      exclude: params.exclude,
      outputDtype: params.output_dtype,
      metadata: { "papa.method": params.method, "papa.inputs": inputs.map((c) => c.id).join(",") },
      blockElements,
    },
  ];
}

/**
 * Plans (or checks) a merge from its inputs' headers, off the event loop (`planMergeOffThread`),
 * as request errors: 413 when the headers are too large together, 422 naming the first mismatch.
 */
async function preflight<T>(plan: () => Promise<T>): Promise<T> {
  try {
    return await plan();
  } catch (err) {
    if (err instanceof MergeInputError) throw new InvalidInputError(err.message, { tensor: err.tensor });
    if (err instanceof HeadersTooLargeError) {
      throw new PayloadTooLargeError(err.message, { limit_bytes: err.limitBytes });
    }
    if (err instanceof MergeSpecError || err instanceof SafetensorsError)
      throw new InvalidInputError(err.message);
    throw err;
  }
}

/**
 * Validates a merge request against its inputs (they exist, belong to the tenant, fit the
 * limits, and agree tensor by tensor) and creates the job. Nothing is enqueued for a request
 * that could only fail.
 */
export async function createMergeJob({
  ctx,
  principal,
  input,
}: TenantCall<{ params: MergeParams; idempotencyKey?: string | undefined }>): Promise<{
  job: Job;
  created: boolean;
}> {
  const { params } = input;
  if (new Set(params.inputs).size !== params.inputs.length) {
    throw new InvalidInputError("inputs must be distinct checkpoints");
  }
  const inputs = await loadInputs(ctx, principal.tenantId, params.inputs);
  if (params.evaluate) {
    await describeDatasetRef({ ctx, principal, input: { dataset: params.evaluate.dataset } });
    const untrained = inputs.find((c) => c.topology === null);
    if (untrained) {
      throw new InvalidInputError(
        `evaluate needs models this service trained; checkpoint ${untrained.id} has no TF.js topology`,
      );
    }
    if (params.exclude?.length || params.output_dtype) {
      throw new InvalidInputError(
        "an evaluated merge averages whole float32 models: exclude and output_dtype do not apply",
      );
    }
  }
  const total = inputs.reduce((n, c) => n + c.sizeBytes, 0);
  if (total > ctx.limits.maxMergeInputBytes) {
    throw new PayloadTooLargeError(
      `the inputs hold ${total} bytes; a merge may read at most ${ctx.limits.maxMergeInputBytes}`,
      {
        limit_bytes: ctx.limits.maxMergeInputBytes,
      },
    );
  }
  await preflight(() => checkMergeOffThread(...planArguments(ctx, params, inputs, 1 << 16)));
  return createJob({
    ctx,
    principal,
    input: { kind: "merge", params, idempotencyKey: input.idempotencyKey },
  });
}

export function outputName(params: MergeParams, j: number, outputs: number): string {
  const base = params.name ?? `${params.method}-merge`;
  return outputs === 1 ? base : `${base}-${j}`;
}

export interface MergeWorkerOptions extends TfjsOptions {
  threads: number;
}

/** What an attempt produced, ready to register. */
export interface MergeOutputs {
  rows: ReturnType<typeof outputRow>[];
  /** Test accuracy of each output (evaluated merges only). */
  accuracies: number[] | null;
}

/**
 * The merge queue's handler. Streams the merge from the store into new objects under ids
 * derived from the job id, validating each output with the upload parser, then registers
 * the outputs, their lineage edges and the job's success in one transaction. A canceled or
 * failed attempt deletes what it wrote; a retry after a crash rewrites the same keys.
 */
export async function runMergeJob(
  ctx: ServiceContext,
  queued: QueuedJob,
  options: MergeWorkerOptions,
): Promise<void> {
  await runJobAttempt(ctx, queued, MERGE_JOB, (attempt) => mergeAttempt(ctx, attempt, options));
}

/** The merge queue's handler for a job whose attempts are all spent (`failAbandonedJob`). */
export function abandonMergeJob(ctx: ServiceContext, id: string): Promise<void> {
  return failAbandonedJob(ctx, id, MERGE_JOB);
}

/** Output j of merge job `jobId`. */
function outputId(jobId: string, j: number): string {
  return derivedId(jobId, `output-${j}`);
}

const MERGE_JOB: JobRules = {
  title: "Merge failed",
  progressIntervalMs: 250,
  isPermanent: (err) => err instanceof PermanentMergeError || (err instanceof TfjsTaskError && err.permanent),
  // Every method has at most one output per input.
  outputIds: (job) => (job.params as MergeParams).inputs.map((_, j) => outputId(job.id, j)),
};

async function mergeAttempt(
  ctx: ServiceContext,
  jobAttempt: JobAttempt,
  options: MergeWorkerOptions,
): Promise<AttemptOutcome> {
  const { job } = jobAttempt;
  const params = job.params as MergeParams;
  // An input deleted since the submit is a request error: the runner fails the job without retries.
  const inputs = await loadInputs(ctx, job.tenantId, params.inputs);
  let coefficients: number[][];
  try {
    coefficients = mergeCoefficients(methodOf(params), inputs.length);
  } catch (err) {
    throw err instanceof MergeSpecError ? new PermanentMergeError(err.message) : err;
  }
  const ids = coefficients.map((_, j) => outputId(job.id, j));
  const attempt = { ...jobAttempt, ctx, params, inputs, coefficients, ids };
  const outputs = params.evaluate
    ? await evaluatedMerge(attempt, options)
    : await streamedMerge(attempt, options.threads);
  const result = {
    checkpoints: outputs.rows.map((r, j) => ({
      id: r.id,
      name: r.name,
      size_bytes: r.sizeBytes,
      sha256: r.sha256,
      ...(outputs.accuracies ? { accuracy: outputs.accuracies[j] } : {}),
    })),
  };
  const register = async (tx: Database) => {
    await tx.insert(schema.checkpoints).values(outputs.rows).onConflictDoNothing();
    const edges = ids.flatMap((childId, j) =>
      inputs.flatMap((parent, k) => {
        const coefficient = coefficients[j]?.[k] ?? 0;
        return coefficient === 0
          ? []
          : [{ parentId: parent.id, childId, coefficient, method: params.method, jobId: job.id }];
      }),
    );
    await tx.insert(schema.lineageEdges).values(edges).onConflictDoNothing();
    if (outputs.accuracies && params.evaluate) {
      const dataset = params.evaluate.dataset;
      const metrics = ids.map((id, j) => ({
        id: derivedId(job.id, `metric-${j}`),
        checkpointId: id,
        dataset,
        split: "test",
        name: "accuracy",
        value: outputs.accuracies?.[j] ?? 0,
        jobId: job.id,
      }));
      await tx.insert(schema.metrics).values(metrics).onConflictDoNothing();
    }
  };
  return { result, register };
}

interface MergeAttempt extends JobAttempt {
  ctx: ServiceContext;
  params: MergeParams;
  inputs: CheckpointRow[];
  coefficients: number[][];
  /** The outputs' checkpoint ids, one per row of `coefficients`. */
  ids: string[];
}

/** The streamed merge of the bytes (any safetensors checkpoints), on worker threads. */
async function streamedMerge(a: MergeAttempt, threads: number): Promise<MergeOutputs> {
  const { ctx, job, params, inputs, ids } = a;
  const pool = new MergePool(threads);
  try {
    const blockElements = blockElementsFor(inputs.length, ids.length, slotCount(pool));
    const plan = await preflight(() =>
      planMergeOffThread(...planArguments(ctx, params, inputs, blockElements)),
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
          name: outputName(params, j, ids.length),
          jobId: job.id,
          summary: summaries[j] as SafetensorsSummary,
        }),
      ),
      accuracies: null,
    };
  } finally {
    await pool.close();
  }
}

/**
 * The evaluated merge of models this service trained, in a process of its own
 * (`runEvaluationTask`), which stores its outputs.
 */
async function evaluatedMerge(a: MergeAttempt, options: TfjsOptions): Promise<MergeOutputs> {
  const { ctx, job, params, inputs, coefficients, ids } = a;
  const evaluation = params.evaluate;
  if (!evaluation) throw new Error("not an evaluated merge");
  const task: EvaluationTask = {
    job: { id: job.id, tenantId: job.tenantId },
    params,
    inputs: inputs.map((c) => ({ storageKey: c.storageKey, sizeBytes: c.sizeBytes, topology: c.topology })),
    coefficients,
    ids,
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
  /** The outputs' checkpoint ids. */
  ids: string[];
  source: DatasetSource;
}
