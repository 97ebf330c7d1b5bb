import { type Database, schema } from "../../db/client.js";
import { derivedId } from "../../ids.js";
import { type TfjsOptions, TfjsTaskError } from "../../jobs/tfjs-process.js";
import { MergeSpecError } from "../../merge/methods.js";
import type { MergePool } from "../../merge/pool.js";
import type { outputRow } from "../checkpoints/outputs.js";
import { insertCheckpoints, insertMetrics } from "../checkpoints/registry.js";
import type { ServiceContext } from "../context.js";
import { type AttemptOutcome, type JobAttempt, type JobRules, jobHandlers } from "../jobs/attempts.js";
import { openNextRound } from "../populations/rounds.js";
import { evaluatedMerge } from "./evaluated-merge.js";
import { type CheckpointRow, coefficientsOf, loadInputs, type MergeParams, outputName } from "./merges.js";
import { streamedMerge } from "./streamed-merge.js";

/** Why a merge cannot succeed however often it is retried. */
class PermanentMergeError extends Error {}

export interface MergeWorkerOptions extends TfjsOptions {
  /** The worker process's merge threads, shared by its merge jobs. */
  pool: MergePool;
}

/** What an attempt produced, ready to register. */
export interface MergeOutputs {
  rows: ReturnType<typeof outputRow>[];
  /** Test accuracy of each output (evaluated merges only). */
  accuracies: number[] | null;
}

/** Output j of merge job `jobId`. */
function outputId(jobId: string, j: number): string {
  return derivedId(jobId, `output-${j}`);
}

const MERGE_JOB: JobRules = {
  title: "Merge failed",
  progressIntervalMs: 250,
  isPermanent: (err) => err instanceof PermanentMergeError || (err instanceof TfjsTaskError && err.permanent),
  // Every method has at most one output per input; a population's round, one per member.
  outputIds: (job) => {
    const params = job.params as MergeParams;
    const outputs = params.population?.coefficients.length ?? params.inputs.length;
    return Array.from({ length: outputs }, (_, j) => outputId(job.id, j));
  },
};

/**
 * The merge queue's handlers. Streams the merge from the store into new objects under ids
 * derived from the job id, validating each output with the upload parser, then registers
 * the outputs, their lineage edges and the job's success in one transaction. A canceled or
 * failed attempt deletes what it wrote; a retry after a crash rewrites the same keys.
 */
export const mergeJob = jobHandlers<MergeWorkerOptions>(MERGE_JOB, mergeAttempt);

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
    coefficients = coefficientsOf(params, inputs.length);
  } catch (err) {
    throw err instanceof MergeSpecError ? new PermanentMergeError(err.message) : err;
  }
  const ids = coefficients.map((_, j) => outputId(job.id, j));
  const names = ids.map((_, j) => outputName(params, j, ids.length));
  // Outputs with the same coefficients (a papa-all round's members) are one object, computed
  // and written once, and registered under each output's id.
  const twin = coefficients.map((row, j) =>
    coefficients.findIndex((other, k) => k <= j && other.every((c, i) => c === row[i])),
  );
  const distinct = twin.flatMap((t, j) => (t === j ? [j] : []));
  const attempt = {
    ...jobAttempt,
    ctx,
    params,
    inputs,
    coefficients: distinct.map((j) => coefficients[j] as number[]),
    ids: distinct.map((j) => ids[j] as string),
    names: distinct.map((j) => names[j] as string),
  };
  const computed = params.evaluate
    ? await evaluatedMerge(attempt, options)
    : await streamedMerge(attempt, options.pool);
  const population = params.population;
  const of = (j: number) => distinct.indexOf(twin[j] as number);
  // A twin is its computed output's row under its own id and name (the bytes stay where they are).
  const rows = ids.map((id, j) => ({
    ...(computed.rows[of(j)] as (typeof computed.rows)[number]),
    id,
    name: names[j] as string,
    ...(population && {
      populationId: population.id,
      populationRound: population.round,
      populationMember: population.soup ? null : j,
    }),
  }));
  const accuracies = computed.accuracies && ids.map((_, j) => computed.accuracies?.[of(j)] as number);
  const result = {
    checkpoints: rows.map((r, j) => ({
      id: r.id,
      name: r.name,
      size_bytes: r.sizeBytes,
      sha256: r.sha256,
      ...(accuracies ? { accuracy: accuracies[j] } : {}),
    })),
    ...(population?.soup ? { soup_checkpoint_id: ids[0] } : {}),
  };
  const register = async (tx: Database) => {
    await insertCheckpoints(tx, rows);
    const edges = ids.flatMap((childId, j) =>
      inputs.flatMap((parent, k) => {
        const coefficient = coefficients[j]?.[k] ?? 0;
        return coefficient === 0
          ? []
          : [{ parentId: parent.id, childId, coefficient, method: params.method, jobId: job.id }];
      }),
    );
    await tx.insert(schema.lineageEdges).values(edges).onConflictDoNothing();
    if (accuracies && params.evaluate) {
      const dataset = params.evaluate.dataset;
      const metrics = ids.map((id, j) => ({
        id: derivedId(job.id, `metric-${j}`),
        tenantId: job.tenantId,
        checkpointId: id,
        dataset,
        split: "test",
        name: "accuracy",
        value: accuracies[j] ?? 0,
        jobId: job.id,
      }));
      await insertMetrics(tx, metrics);
    }
    if (population && !population.soup) await openNextRound(tx, population);
  };
  return { result, register };
}

export interface MergeAttempt extends JobAttempt {
  ctx: ServiceContext;
  params: MergeParams;
  inputs: CheckpointRow[];
  coefficients: number[][];
  /** The outputs' checkpoint ids and names, one per row of `coefficients`. */
  ids: string[];
  names: string[];
}
