import { and, eq, inArray } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { type MergeMethod, MergeSpecError, mergeCoefficients } from "../../merge/methods.js";
import { MergeInputError } from "../../merge/plan.js";
import {
  checkMergeOffThread,
  type HeaderLimits,
  HeadersTooLargeError,
  type PlanInput,
} from "../../merge/preflight.js";
import type { FloatDtype } from "../../tensors/floats.js";
import { SafetensorsError } from "../../tensors/safetensors.js";
import type { ByteSource } from "../../tensors/source.js";
import { isSharded, storedFiles, weightFiles, weightSources } from "../checkpoints/files.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { describeDatasetRef } from "../datasets/datasets.js";
import { InvalidInputError, PayloadTooLargeError } from "../errors.js";
import { createJob, type Job } from "../jobs/jobs.js";

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
  /** Set by the populations service, never by a request: this merge is a population's. */
  population?: PopulationMerge | undefined;
}

/**
 * A population's round (one output per member, in member order) or final soup (one output),
 * with the coefficients worked out when the round closed (`roundCoefficients`).
 */
export interface PopulationMerge {
  id: string;
  round: number;
  soup: boolean;
  coefficients: number[][];
}

/** The merge's coefficient matrix: one row per output, one column per input. */
export function coefficientsOf(params: MergeParams, inputs: number): number[][] {
  return params.population?.coefficients ?? mergeCoefficients(methodOf(params), inputs);
}

export function methodOf(p: MergeParams): MergeMethod {
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

export type CheckpointRow = typeof schema.checkpoints.$inferSelect;

export async function loadInputs(
  ctx: ServiceContext,
  tenantId: string,
  ids: string[],
): Promise<CheckpointRow[]> {
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

/**
 * What planning a merge of `inputs` into the outputs of `coefficients` takes: their weights'
 * files, the header limits, and the plan's options (outputs sharded as the first input is).
 */
export function planArguments(
  ctx: ServiceContext,
  params: MergeParams,
  inputs: CheckpointRow[],
  coefficients: number[][],
  blockElements: number,
): [ByteSource[][], HeaderLimits, PlanInput] {
  const stored = inputs.map(storedFiles);
  const first = stored[0];
  return [
    stored.map((c) => weightSources(ctx.store, c)),
    {
      maxHeaderBytes: ctx.limits.maxSafetensorsHeaderBytes,
      maxTotalHeaderBytes: ctx.limits.maxMergeHeaderBytes,
    },
    {
      coefficients,
      labels: inputs.map((c) => `checkpoint ${c.id}`),
      exclude: params.exclude,
      outputDtype: params.output_dtype,
      metadata: { "papa.method": params.method, "papa.inputs": inputs.map((c) => c.id).join(",") },
      blockElements,
      outputShardNames: first && isSharded(first) ? weightFiles(first).map((f) => f.name) : null,
    },
  ];
}

/**
 * Plans (or checks) a merge from its inputs' headers, off the event loop (`planMergeOffThread`),
 * as request errors: 413 when the headers are too large together, 422 naming the first mismatch.
 */
export async function preflight<T>(plan: () => Promise<T>): Promise<T> {
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
  await preflight(() =>
    checkMergeOffThread(
      ...planArguments(ctx, params, inputs, coefficientsOf(params, inputs.length), 1 << 16),
    ),
  );
  return createJob({
    ctx,
    principal,
    input: { kind: "merge", params, idempotencyKey: input.idempotencyKey },
  });
}

export function outputName(params: MergeParams, j: number, outputs: number): string {
  const base = params.name ?? `${params.method}-merge`;
  const population = params.population;
  if (population) return population.soup ? `${base}-soup` : `${base}-round-${population.round}-member-${j}`;
  return outputs === 1 ? base : `${base}-${j}`;
}
