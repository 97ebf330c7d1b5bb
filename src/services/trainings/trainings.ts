import { type Database, schema } from "../../db/client.js";
import { derivedId } from "../../ids.js";
import { runTfjsTask, type TfjsOptions, TfjsTaskError, tfjsEnvironment } from "../../jobs/tfjs-process.js";
import type { BuiltInDataset } from "../../ml/datasets.js";
import { estimateTrainingMemory } from "../../ml/memory.js";
import type { ModelSpec } from "../../ml/models.js";
import type { TrainingSpec, Variant } from "../../ml/population.js";
import {
  insertCheckpoints,
  insertMetrics,
  type NewCheckpoint,
  type NewMetric,
} from "../checkpoints/registry.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { type DatasetSource, datasetSource, describeDatasetRef } from "../datasets/datasets.js";
import { InvalidInputError } from "../errors.js";
import { type AttemptOutcome, type JobAttempt, type JobRules, jobHandlers } from "../jobs/attempts.js";
import { createJob, type Job } from "../jobs/jobs.js";
import { placeShards, shardRequests } from "./placement.js";
import { type Placement, placementOf } from "./shards.js";

/** A training request as stored in the job's params (the API's field names). */
export interface TrainingParams {
  /** A built-in dataset's name, or the id of a dataset the tenant uploaded. */
  dataset: BuiltInDataset | string;
  max_train_examples?: number | undefined;
  max_test_examples?: number | undefined;
  model: ModelSpec;
  population: {
    size: number;
    variant: Variant;
    seed?: number | undefined;
    alpha?: number | undefined;
    every_k_steps?: number | undefined;
    lr_scaling?: "linear" | "none" | undefined;
    every_k_epochs?: number | undefined;
  };
  diversity?:
    | {
        mixup?: number[] | undefined;
        label_smoothing?: number[] | undefined;
        cutmix?: number[] | undefined;
        random_erasing?: number[] | undefined;
      }
    | undefined;
  optimizer?:
    | {
        kind?: "sgd" | "adamw" | undefined;
        lr?: number | undefined;
        momentum?: number | undefined;
        nesterov?: boolean | undefined;
        weight_decay?: number | undefined;
        schedule?: "cosine" | "constant" | undefined;
        min_lr?: number | undefined;
        warmup_steps?: number | undefined;
      }
    | undefined;
  epochs: number;
  batch_size?: number | undefined;
  /** Set when the job is created: the dataset's default (`DatasetDescription.natural`) if absent. */
  base_augmentation?: boolean | undefined;
  name?: string | undefined;
  /** Train the members in `workers` jobs that average through a population (`placement.ts`). */
  placement?: { workers: number; round_timeout_seconds?: number | undefined } | undefined;
  /** Set on the jobs a placed training makes for its other shards, never by a request. */
  shard?: { lead_job_id: string; index: number } | undefined;
}

/** The request with PAPA.md's defaults filled in (alpha 0.99 from scratch, every 10 steps, ...). */
export function trainingSpecOf(p: TrainingParams): TrainingSpec {
  const pop = p.population;
  const d = p.diversity ?? {};
  const o = p.optimizer ?? {};
  const kind = o.kind ?? "sgd";
  return {
    model: p.model,
    population: {
      size: pop.size,
      variant: pop.variant,
      seed: pop.seed ?? 0,
      alpha: pop.alpha ?? 0.99,
      everyKSteps: pop.every_k_steps ?? 10,
      lrScaling: pop.lr_scaling ?? "linear",
      everyKEpochs: pop.every_k_epochs ?? 5,
    },
    diversity: {
      mixup: d.mixup ?? [0],
      labelSmoothing: d.label_smoothing ?? [0],
      cutmix: d.cutmix ?? [0],
      randomErasing: d.random_erasing ?? [0],
    },
    optimizer: {
      kind,
      lr: o.lr ?? (kind === "sgd" ? 0.05 : 1e-3),
      momentum: o.momentum ?? 0.9,
      nesterov: o.nesterov ?? true,
      weightDecay: o.weight_decay ?? 5e-4,
      schedule: o.schedule ?? "cosine",
      minLr: o.min_lr ?? 1e-4,
      warmupSteps: o.warmup_steps ?? 0,
    },
    epochs: p.epochs,
    batchSize: p.batch_size ?? 128,
    baseAugmentation: p.base_augmentation ?? false,
  };
}

/** Creates a training job after checking what the schema cannot (the dataset exists, the schedule). */
export async function createTrainingJob({
  ctx,
  principal,
  input,
}: TenantCall<{ params: TrainingParams; idempotencyKey?: string | undefined }>): Promise<{
  job: Job;
  created: boolean;
}> {
  const { params } = input;
  const spec = trainingSpecOf(params);
  const data = await describeDatasetRef({ ctx, principal, input: { dataset: params.dataset } });
  if (spec.optimizer.minLr > spec.optimizer.lr) {
    throw new InvalidInputError(
      `optimizer.min_lr (${spec.optimizer.minLr}) exceeds optimizer.lr (${spec.optimizer.lr})`,
    );
  }
  const workers = params.placement?.workers ?? 1;
  if (workers > spec.population.size) {
    throw new InvalidInputError(
      `placement.workers (${workers}) exceeds the population (${spec.population.size} members): each worker trains one member at least`,
    );
  }
  if (workers > 1 && workers + 1 > ctx.limits.maxRunningJobsPerTenant) {
    throw new InvalidInputError(
      `placement.workers (${workers}) needs ${workers + 1} jobs running at once (the shards and a round's merge); ` +
        `this service runs at most ${ctx.limits.maxRunningJobsPerTenant} of a tenant's (PAPA_TENANT_MAX_RUNNING_JOBS)`,
      { limit: ctx.limits.maxRunningJobsPerTenant - 1 },
    );
  }
  const examples =
    Math.min(data.trainCount, params.max_train_examples ?? data.trainCount) +
    Math.min(data.testCount, params.max_test_examples ?? data.testCount);
  const memory = estimateTrainingMemory(spec, { shape: data.shape, classes: data.classes, examples });
  const limit = ctx.limits.maxTrainingMemoryBytes;
  if (memory.bytes > limit) {
    const gb = (bytes: number) => `${(bytes / 1024 ** 3).toFixed(1)} GiB`;
    throw new InvalidInputError(
      `this training would take about ${gb(memory.bytes)} of memory (population ${gb(memory.parts.population)}, ` +
        `a step ${gb(memory.parts.step)}, data ${gb(memory.parts.data)}, copies ${gb(memory.parts.copies)}); ` +
        `the limit is ${gb(limit)}: train fewer or smaller members, or smaller batches`,
      { estimated_bytes: memory.bytes, limit_bytes: limit },
    );
  }
  return createJob({
    ctx,
    principal,
    input: {
      kind: "train",
      params: { ...params, base_augmentation: params.base_augmentation ?? data.natural },
      idempotencyKey: input.idempotencyKey,
    },
  });
}

/** A training job's work, for the process that trains (`training-task.ts`). */
export interface TrainingTask {
  job: { id: string; tenantId: string; params: TrainingParams };
  source: DatasetSource;
  /** The job's shard of a training placed on several workers. */
  placement: Placement | null;
}

/** What the training process hands back: the job's result, and the rows it registers. */
export interface TrainingTaskOutput {
  result: object;
  rows: NewCheckpoint[];
  edges: (typeof schema.lineageEdges.$inferInsert)[];
  metrics: NewMetric[];
}

/** What a training stores, in order: its members, then its uniform and its greedy soup. */
export function outputLabels(populationSize: number): string[] {
  const members = Array.from({ length: populationSize }, (_, j) => `member-${j}`);
  return [...members, "uniform-soup", "greedy-soup"];
}

const TRAINING_JOB: JobRules = {
  title: "Training failed",
  progressIntervalMs: 500,
  isPermanent: (err) => err instanceof TfjsTaskError && err.permanent,
  // A placed training's other shards store nothing of their own: the lead stores the outputs.
  outputIds: (job) =>
    (job.params as TrainingParams).shard
      ? []
      : outputLabels(trainingSpecOf(job.params as TrainingParams).population.size).map((label) =>
          derivedId(job.id, label),
        ),
};

/**
 * The train queue's handlers: trains the population in a process of its own (`runTrainingTask`),
 * then registers its outputs with their test accuracy (metrics), the soups' lineage edges to the
 * members, and the job's result, in one transaction. A canceled or failed attempt deletes what
 * it stored; a training process that crashes fails the attempt alone.
 */
export const trainingJob = jobHandlers<TfjsOptions>(TRAINING_JOB, trainingAttempt);

async function trainingAttempt(
  ctx: ServiceContext,
  { job, signal, progress }: JobAttempt,
  options: TfjsOptions,
): Promise<AttemptOutcome> {
  const params = job.params as TrainingParams;
  const source = await datasetSource({ ctx, principal: job, input: { dataset: params.dataset } });
  const placement = placementOf(job);
  if (placement?.shard === 0) await placeShards(ctx, job, placement);
  const task: TrainingTask = { job: { id: job.id, tenantId: job.tenantId, params }, source, placement };
  const output = await runTfjsTask<TrainingTaskOutput>(
    { kind: "train", input: task },
    tfjsEnvironment(ctx, options),
    {
      signal,
      onProgress: progress,
      onStart: (pid) => ctx.logger.info("training process started", { job_id: job.id, pid }),
      ...(placement ? { onRequest: shardRequests(ctx, job, placement, signal) } : {}),
    },
  );
  const register = async (tx: Database) => {
    // A placed training's other shards register nothing.
    if (output.rows.length === 0) return;
    await insertCheckpoints(tx, output.rows);
    await tx.insert(schema.lineageEdges).values(output.edges).onConflictDoNothing();
    await insertMetrics(tx, output.metrics);
  };
  return { result: output.result, register };
}
