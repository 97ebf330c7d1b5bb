import { Readable } from "node:stream";
import type * as tf from "@tensorflow/tfjs";
import { type Database, schema } from "../../db/client.js";
import { derivedId } from "../../ids.js";
import type { QueuedJob } from "../../jobs/queue.js";
import { BackendError, type BackendName, selectBackend } from "../../ml/backend.js";
import { DatasetError } from "../../ml/dataset-formats.js";
import {
  BUILT_IN_DATASETS,
  type BuiltInDataset,
  type Dataset,
  type LoadOptions,
  limitDataset,
  loadBuiltInDataset,
} from "../../ml/datasets.js";
import { modelToSafetensors } from "../../ml/export.js";
import { estimateTrainingMemory } from "../../ml/memory.js";
import type { ModelSpec } from "../../ml/models.js";
import { DivergenceError, type TrainingSpec, trainPopulation, type Variant } from "../../ml/train.js";
import { outputRow, storeOutput } from "../checkpoints/outputs.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { describeDatasetRef, loadUploadedDataset } from "../datasets/datasets.js";
import { InvalidInputError } from "../errors.js";
import {
  type AttemptOutcome,
  createJob,
  failAbandonedJob,
  type Job,
  type JobAttempt,
  type JobRules,
  runJobAttempt,
} from "../jobs/jobs.js";
import { loadTrainingState, saveTrainingState, trainingStateKey } from "./state.js";

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
  name?: string | undefined;
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
  };
}

/** A built-in dataset by name, or an uploaded one by id, cut to the requested subsets. */
export async function loadTrainingData(
  ctx: ServiceContext,
  tenantId: string,
  dataset: string,
  options: LoadOptions,
): Promise<Dataset> {
  if ((BUILT_IN_DATASETS as readonly string[]).includes(dataset)) {
    return loadBuiltInDataset(dataset as BuiltInDataset, options);
  }
  return limitDataset(await loadUploadedDataset(ctx, tenantId, dataset), options);
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
    input: { kind: "train", params, idempotencyKey: input.idempotencyKey },
  });
}

export interface TrainingWorkerOptions {
  backend?: BackendName | undefined;
  fashionMnistDir: string;
}

/**
 * The train queue's handler: trains the population, then stores every member, the uniform soup
 * and the greedy soup as safetensors with their TF.js topology, and registers them with their
 * test accuracy (metrics), the soups' lineage edges to the members, and the job's result, in one
 * transaction. A canceled or failed attempt deletes what it stored.
 */
export async function runTrainingJob(
  ctx: ServiceContext,
  queued: QueuedJob,
  options: TrainingWorkerOptions,
): Promise<void> {
  await runJobAttempt(ctx, queued, TRAINING_JOB, (attempt) => trainingAttempt(ctx, attempt, options));
}

/** The train queue's handler for a job whose attempts are all spent (`failAbandonedJob`). */
export function abandonTrainingJob(ctx: ServiceContext, id: string): Promise<void> {
  return failAbandonedJob(ctx, id, TRAINING_JOB);
}

/** What a training stores, in order: its members, then its uniform and its greedy soup. */
function outputLabels(populationSize: number): string[] {
  const members = Array.from({ length: populationSize }, (_, j) => `member-${j}`);
  return [...members, "uniform-soup", "greedy-soup"];
}

const TRAINING_JOB: JobRules = {
  title: "Training failed",
  progressIntervalMs: 500,
  isPermanent: (err) =>
    err instanceof BackendError || err instanceof DatasetError || err instanceof DivergenceError,
  outputIds: (job) =>
    outputLabels(trainingSpecOf(job.params as TrainingParams).population.size).map((label) =>
      derivedId(job.id, label),
    ),
};

async function trainingAttempt(
  ctx: ServiceContext,
  { job, signal, progress }: JobAttempt,
  options: TrainingWorkerOptions,
): Promise<AttemptOutcome> {
  const params = job.params as TrainingParams;
  const spec = trainingSpecOf(params);
  const models: tf.LayersModel[] = [];
  const started = performance.now();
  try {
    const backend = await selectBackend({ forced: options.backend });
    const data = await loadTrainingData(ctx, job.tenantId, params.dataset, {
      fashionMnistDir: options.fashionMnistDir,
      maxTrain: params.max_train_examples,
      maxTest: params.max_test_examples,
    });
    const loadSeconds = (performance.now() - started) / 1000;
    const stateKey = trainingStateKey(job);
    const resume = await loadTrainingState(ctx, stateKey);
    if (resume) ctx.logger.info("resuming training", { job_id: job.id, completed_epochs: resume.epochs });
    const outcome = await trainPopulation(spec, data, {
      signal,
      resume: resume ?? undefined,
      onEpochEnd: (state) => saveTrainingState(ctx, stateKey, state),
      onProgress: (p) =>
        progress((0.95 * p.step) / p.steps, {
          epoch: p.epoch,
          step: p.step,
          steps: p.steps,
          loss: p.loss,
          examples_per_second: p.examplesPerSecond,
        }),
    });
    models.push(...outcome.members.map((m) => m.model), outcome.uniformSoup.model, outcome.greedySoup.model);

    const base = params.name ?? `${spec.population.variant}-${params.dataset}`;
    const labels = outputLabels(outcome.members.length);
    const outputs = [...outcome.members, outcome.uniformSoup, outcome.greedySoup].map(
      ({ model, accuracy }, i) => {
        const label = labels[i] as string;
        return { label, name: `${base}-${label}`, id: derivedId(job.id, label), model, accuracy };
      },
    );
    const rows: ReturnType<typeof outputRow>[] = [];
    for (const o of outputs) {
      const { bytes, topology } = modelToSafetensors(o.model, { "papa.role": o.label, "papa.job": job.id });
      const summary = await storeOutput(ctx, job.tenantId, o.id, Readable.from([bytes]));
      rows.push(
        outputRow({ id: o.id, tenantId: job.tenantId, name: o.name, jobId: job.id, summary, topology }),
      );
    }
    const memberIds = outputs.slice(0, outcome.members.length).map((o) => o.id);
    const [uniformId, greedyId] = [outputs.at(-2)?.id ?? "", outputs.at(-1)?.id ?? ""];
    const edges = [
      ...memberIds.map((parentId) => ({
        parentId,
        childId: uniformId,
        coefficient: 1 / memberIds.length,
        method: "uniform-soup",
      })),
      ...outcome.greedySoup.ingredients.map((i) => ({
        parentId: memberIds[i] ?? "",
        childId: greedyId,
        coefficient: 1 / outcome.greedySoup.ingredients.length,
        method: "greedy-soup",
      })),
    ].map((e) => ({ ...e, jobId: job.id }));
    const result = {
      checkpoints: rows.map((r) => ({ id: r.id, name: r.name, size_bytes: r.sizeBytes, sha256: r.sha256 })),
      backend,
      members: outcome.members.map((m, j) => ({
        checkpoint_id: memberIds[j],
        accuracy: m.accuracy,
        held_out_accuracy: m.heldOutAccuracy,
        diversity: {
          mixup: m.diversity.mixup,
          label_smoothing: m.diversity.labelSmoothing,
          cutmix: m.diversity.cutmix,
          random_erasing: m.diversity.randomErasing,
        },
      })),
      ensemble_accuracy: outcome.ensembleAccuracy,
      uniform_soup: { checkpoint_id: uniformId, accuracy: outcome.uniformSoup.accuracy },
      greedy_soup: {
        checkpoint_id: greedyId,
        accuracy: outcome.greedySoup.accuracy,
        members: outcome.greedySoup.ingredients.map((i) => memberIds[i]),
      },
      seconds: {
        load: loadSeconds,
        train: outcome.seconds.train,
        evaluate: outcome.seconds.evaluate,
        total: (performance.now() - started) / 1000,
      },
    };
    const register = async (tx: Database) => {
      await tx.insert(schema.checkpoints).values(rows).onConflictDoNothing();
      await tx.insert(schema.lineageEdges).values(edges).onConflictDoNothing();
      await tx
        .insert(schema.metrics)
        .values(
          outputs.map((o) => ({
            id: derivedId(job.id, `metric-${o.label}`),
            checkpointId: o.id,
            dataset: params.dataset,
            split: "test",
            name: "accuracy",
            value: o.accuracy,
            jobId: job.id,
          })),
        )
        .onConflictDoNothing();
    };
    return { result, register };
  } finally {
    for (const m of models) m.dispose();
  }
}
