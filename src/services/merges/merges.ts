import { and, eq, inArray } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { derivedId } from "../../ids.js";
import type { QueuedJob } from "../../jobs/queue.js";
import { blockElementsFor, runMerge, slotCount, streamSink } from "../../merge/engine.js";
import { type MergeMethod, MergeSpecError, mergeCoefficients } from "../../merge/methods.js";
import { MergeMismatchError, type MergePlan, planMerge } from "../../merge/plan.js";
import { MergePool } from "../../merge/pool.js";
import type { FloatDtype } from "../../tensors/floats.js";
import { SafetensorsError, type SafetensorsSummary } from "../../tensors/safetensors.js";
import { readSafetensorsHeader, storeSource } from "../../tensors/source.js";
import { deleteOutputs, outputRow, storeOutput } from "../checkpoints/outputs.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { InvalidInputError, PayloadTooLargeError } from "../errors.js";
import {
  createJob,
  finishJob,
  type Job,
  reportProgress,
  settleFailedAttempt,
  startJobAttempt,
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

/** Reads the inputs' headers (ranged reads, no data) and plans the merge; 422 naming the first mismatch. */
async function preflight(
  ctx: ServiceContext,
  params: MergeParams,
  inputs: CheckpointRow[],
  blockElements: number,
): Promise<MergePlan> {
  try {
    const coefficients = mergeCoefficients(methodOf(params), inputs.length);
    const headers = await Promise.all(
      inputs.map((c) =>
        readSafetensorsHeader(
          storeSource(ctx.store, c.storageKey, c.sizeBytes),
          ctx.limits.maxSafetensorsHeaderBytes,
        ),
      ),
    );
    return planMerge({
      headers,
      coefficients,
      labels: inputs.map((c) => `checkpoint ${c.id}`),
      exclude: params.exclude,
      outputDtype: params.output_dtype,
      metadata: { "papa.method": params.method, "papa.inputs": inputs.map((c) => c.id).join(",") },
      blockElements,
    });
  } catch (err) {
    if (err instanceof MergeMismatchError) throw new InvalidInputError(err.message, { tensor: err.tensor });
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
  const total = inputs.reduce((n, c) => n + c.sizeBytes, 0);
  if (total > ctx.limits.maxMergeInputBytes) {
    throw new PayloadTooLargeError(
      `the inputs hold ${total} bytes; a merge may read at most ${ctx.limits.maxMergeInputBytes}`,
      {
        limit_bytes: ctx.limits.maxMergeInputBytes,
      },
    );
  }
  await preflight(ctx, params, inputs, 1 << 16);
  return createJob({
    ctx,
    principal,
    input: { kind: "merge", params, idempotencyKey: input.idempotencyKey },
  });
}

function outputName(params: MergeParams, j: number, outputs: number): string {
  const base = params.name ?? `${params.method}-merge`;
  return outputs === 1 ? base : `${base}-${j}`;
}

/**
 * The merge queue's handler. Streams the merge from the store into new objects under ids
 * derived from the job id, validating each output with the upload parser, then registers
 * the outputs, their lineage edges and the job's success in one transaction. A canceled or
 * failed attempt deletes what it wrote; a retry after a crash rewrites the same keys.
 */
export async function runMergeJob(ctx: ServiceContext, queued: QueuedJob, threads: number): Promise<void> {
  const job = await startJobAttempt(ctx, queued.id);
  if (!job) return;
  const params = job.params as MergeParams;
  const written: string[] = [];
  const abort = new AbortController();
  const onStop = () => abort.abort(queued.signal.reason);
  queued.signal.addEventListener("abort", onStop);
  const pool = new MergePool(threads);
  try {
    let inputs: CheckpointRow[];
    let plan: MergePlan;
    try {
      inputs = await loadInputs(ctx, job.tenantId, params.inputs);
      plan = await preflight(
        ctx,
        params,
        inputs,
        blockElementsFor(params.inputs.length, params.inputs.length, slotCount(pool)),
      );
    } catch (err) {
      throw err instanceof InvalidInputError ? new PermanentMergeError(err.message) : err;
    }
    const outputs = plan.coefficients.length;
    written.push(...Array.from({ length: outputs }, (_, j) => derivedId(job.id, `output-${j}`)));
    const sinks = written.map(() => streamSink());
    const stored = sinks.map((sink, j) => {
      const done = storeOutput(ctx, job.tenantId, written[j] as string, sink.stream);
      done.catch((err: unknown) => abort.abort(err));
      return done;
    });
    let lastReport = 0;
    let summaries: SafetensorsSummary[];
    try {
      await runMerge({
        plan,
        sources: inputs.map((c) => storeSource(ctx.store, c.storageKey, c.sizeBytes)),
        sinks,
        pool,
        signal: abort.signal,
        onProgress: (done, total) => {
          if (Date.now() - lastReport < 250) return;
          lastReport = Date.now();
          reportProgress(ctx, job.id, total === 0 ? 1 : done / total).then(
            (status) => status === "canceled" && abort.abort(new Error("canceled")),
            () => undefined,
          );
        },
      });
      for (const sink of sinks) sink.stream.end();
      summaries = await Promise.all(stored);
    } catch (err) {
      for (const sink of sinks) sink.stream.destroy(err as Error);
      await Promise.allSettled(stored);
      throw err;
    }
    const rows = written.map((id, j) =>
      outputRow({
        id,
        tenantId: job.tenantId,
        name: outputName(params, j, outputs),
        jobId: job.id,
        summary: summaries[j] as SafetensorsSummary,
      }),
    );
    const result = {
      checkpoints: rows.map((r) => ({ id: r.id, name: r.name, size_bytes: r.sizeBytes, sha256: r.sha256 })),
    };
    const committed = await ctx.db.transaction(async (tx) => {
      if (!(await finishJob(tx, job.id, { status: "succeeded", result }))) return false;
      await tx.insert(schema.checkpoints).values(rows).onConflictDoNothing();
      const edges = written.flatMap((childId, j) =>
        inputs.flatMap((parent, k) => {
          const coefficient = plan.coefficients[j]?.[k] ?? 0;
          return coefficient === 0
            ? []
            : [{ parentId: parent.id, childId, coefficient, method: params.method, jobId: job.id }];
        }),
      );
      await tx.insert(schema.lineageEdges).values(edges).onConflictDoNothing();
      return true;
    });
    if (!committed) await deleteOutputs(ctx, job.tenantId, written); // canceled while we wrote
  } catch (err) {
    await deleteOutputs(ctx, job.tenantId, written);
    await settleFailedAttempt(ctx, queued, err, {
      permanent: err instanceof PermanentMergeError,
      title: "Merge failed",
    });
  } finally {
    queued.signal.removeEventListener("abort", onStop);
    await pool.close();
  }
}
