import { Readable } from "node:stream";
import type * as tf from "@tensorflow/tfjs";
import { derivedId } from "../../ids.js";
import type { TaskHooks, TfjsOptions } from "../../jobs/tfjs-process.js";
import { selectBackend } from "../../ml/backend.js";
import type { Dataset } from "../../ml/datasets.js";
import { modelToSafetensors } from "../../ml/export.js";
import { loadWeights } from "../../ml/import.js";
import { buildModel } from "../../ml/models.js";
import {
  type EvaluatedElsewhere,
  evaluateMembers,
  evaluatePopulation,
  type Member,
  memberModel,
  type PreparedData,
  type Progress,
  prepareData,
  type Shard,
  stepsPerEpoch,
  syncRounds,
  type TrainingSpec,
  trainMembers,
  uniformSoup,
} from "../../ml/population.js";
import { readSafetensorsHeader, storeSource } from "../../tensors/source.js";
import { outputRow, storeOutput } from "../checkpoints/outputs.js";
import type { StoreContext } from "../context.js";
import { loadDataset } from "../datasets/datasets.js";
import {
  type Gathered,
  type MemberBytes,
  type ResumePoint,
  type ShardEvaluation,
  type ShardRequest,
  type StoredWeights,
  shardOutputKey,
} from "./placement.js";
import { type Placement, shardMembers } from "./shards.js";
import { loadTrainingState, saveTrainingState, trainingStateKey } from "./state.js";
import { outputLabels, type TrainingTask, type TrainingTaskOutput, trainingSpecOf } from "./trainings.js";

/**
 * A training job's work, in the process of its own that runs it (`runTfjsTask`): trains the
 * population (resuming from the job's last saved epoch, saving each epoch), then stores every
 * member, the uniform soup and the greedy soup as safetensors with their TF.js topology. What it
 * returns is registered by the job's worker, with the job's success, in one transaction. A shard
 * of a placed training trains its members, averaging through the population (and resuming from
 * its latest closed round); the lead then gathers every member and goes on as above, the others
 * return.
 */
export async function runTrainingTask(
  ctx: StoreContext,
  { job, source, placement }: TrainingTask,
  options: TfjsOptions,
  hooks: TaskHooks,
): Promise<TrainingTaskOutput> {
  const { params } = job;
  const spec = trainingSpecOf(params);
  const models: tf.LayersModel[] = [];
  const started = performance.now();
  let prepared: PreparedData | undefined;
  try {
    const backend = await selectBackend({ forced: options.backend });
    const data = await loadDataset(ctx.store, source, {
      fashionMnistDir: options.fashionMnistDir,
      maxTrain: params.max_train_examples,
      maxTest: params.max_test_examples,
    });
    const loadSeconds = (performance.now() - started) / 1000;
    prepared = prepareData(spec, data);
    const onProgress = (p: Progress) =>
      hooks.progress((0.95 * p.step) / p.steps, {
        epoch: p.epoch,
        step: p.step,
        steps: p.steps,
        loss: p.loss,
        examples_per_second: p.examplesPerSecond,
      });
    let population: tf.LayersModel[];
    let trainSeconds = 0;
    let placed: Parameters<typeof evaluatePopulation>[5];
    if (placement) {
      const shard = remoteShard(ctx, job.id, placement, hooks.request);
      const members = await trainMembers(spec, data, prepared, { signal: hooks.signal, onProgress, shard });
      models.push(...members.map((m) => m.model));
      trainSeconds = (performance.now() - started) / 1000 - loadSeconds;
      /** Every member's network with its gathered final weights (this shard's as it trained them). */
      const gatheredModels = async (weights: StoredWeights[]) => {
        const population: tf.LayersModel[] = [];
        for (const w of weights) {
          const own = members.find((m) => m.index === w.member);
          if (own) {
            population.push(own.model);
          } else {
            const model = memberModel(spec, data, w.member);
            models.push(model);
            await writeWeights(ctx, model, w);
            population.push(model);
          }
        }
        return population;
      };
      const round = syncRounds(spec, stepsPerEpoch(spec, prepared)).count;
      const gathered = (await hooks.request({
        kind: "gather",
        round,
        weights: weightsOf(members, job.id),
      } satisfies ShardRequest)) as Gathered;
      // Each shard evaluates its own members (in parallel with the others), the last the uniform
      // soup too; the lead adds theirs. A shard whose final weights were not taken (an earlier
      // attempt's are) leaves it to the lead.
      if (placement.shard !== 0) {
        let evaluation: ShardEvaluation | null = null;
        if (gathered.taken) {
          const own = evaluateMembers(members, data);
          const key = shardOutputKey(job.tenantId, placement, placement.shard, "test-probabilities.f32");
          await ctx.store.put(key, Readable.from([Buffer.from(own.probabilities.buffer)]));
          evaluation = { members: own.members };
        }
        if (evaluation && gathered.weights.length > 0) {
          const soup = uniformSoup(spec, data, prepared, await gatheredModels(gathered.weights));
          models.push(soup.model);
          const key = shardOutputKey(job.tenantId, placement, placement.shard, "uniform-soup.safetensors");
          const { bytes } = modelToSafetensors(soup.model, {
            "papa.role": "uniform-soup",
            "papa.job": job.id,
          });
          await ctx.store.put(key, Readable.from([bytes]));
          evaluation.uniform_soup = { accuracy: soup.accuracy };
        }
        const seconds = { load: loadSeconds, total: (performance.now() - started) / 1000 };
        return {
          result: shardResult(placement, backend, evaluation, seconds),
          rows: [],
          edges: [],
          metrics: [],
        };
      }
      population = await gatheredModels(gathered.weights);
      const elsewhere = () => evaluatedElsewhere(ctx, job.tenantId, placement, hooks, spec, data);
      placed = { here: placement.members, elsewhere };
    } else {
      const stateKey = trainingStateKey(job);
      const resume = await loadTrainingState(ctx, stateKey);
      if (resume) ctx.logger.info("resuming training", { job_id: job.id, completed_epochs: resume.epochs });
      const members = await trainMembers(spec, data, prepared, {
        signal: hooks.signal,
        resume: resume ?? undefined,
        onEpochEnd: (state) => saveTrainingState(ctx, stateKey, state),
        onProgress,
      });
      population = members.map((m) => m.model);
      models.push(...population);
      trainSeconds = (performance.now() - started) / 1000 - loadSeconds;
    }
    const outcome = await evaluatePopulation(spec, data, prepared, population, trainSeconds, placed);
    const evaluateSeconds = (performance.now() - started) / 1000 - loadSeconds - trainSeconds;
    models.push(outcome.uniformSoup.model, outcome.greedySoup.model);

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
      const summary = await storeOutput(ctx, job.tenantId, o.id, bytes);
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
      ...(placement ? { placement: placementResult(placement, params.population.size) } : {}),
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
        train: trainSeconds,
        evaluate: evaluateSeconds,
        total: (performance.now() - started) / 1000,
      },
    };
    const metrics = outputs.map((o) => ({
      id: derivedId(job.id, `metric-${o.label}`),
      tenantId: job.tenantId,
      checkpointId: o.id,
      dataset: params.dataset,
      split: "test",
      name: "accuracy",
      value: o.accuracy,
      jobId: job.id,
    }));
    return { result, rows, edges, metrics };
  } finally {
    for (const b of prepared?.calibration ?? []) b.dispose();
    for (const m of models) m.dispose();
  }
}

/** A lead's account of its placement: its population and each shard's job and members. */
function placementResult(placement: Placement, size: number): object {
  return {
    population_id: placement.populationId,
    shards: placement.jobIds.map((jobId, s) => ({
      job_id: jobId,
      members: shardMembers(size, placement.workers, s),
    })),
  };
}

/**
 * The result of a shard other than the lead: it stores nothing (the lead has its members), and
 * holds its members' evaluation for the lead (their test probabilities are in the store).
 */
function shardResult(
  placement: Placement,
  backend: string,
  evaluation: ShardEvaluation | null,
  seconds: { load: number; total: number },
): object {
  return {
    checkpoints: [],
    backend,
    placement: {
      lead_job_id: placement.leadJobId,
      population_id: placement.populationId,
      shard: placement.shard,
      members: placement.members,
      ...(evaluation ? { evaluation } : {}),
    },
    seconds,
  };
}

/**
 * What the other shards evaluated, for the lead: their members' test accuracies and
 * probabilities, and the uniform soup (its weights as that shard made them).
 */
async function evaluatedElsewhere(
  ctx: StoreContext,
  tenantId: string,
  placement: Placement,
  hooks: TaskHooks,
  spec: TrainingSpec,
  data: Dataset,
): Promise<EvaluatedElsewhere> {
  const theirs = (await hooks.request({ kind: "evaluations" } satisfies ShardRequest)) as (ShardEvaluation & {
    shard: number;
  })[];
  const elsewhere: EvaluatedElsewhere = { evaluations: [], uniformSoup: null };
  for (const { shard, members, uniform_soup } of theirs) {
    const probabilities = await readFloats(
      ctx,
      shardOutputKey(tenantId, placement, shard, "test-probabilities.f32"),
    );
    elsewhere.evaluations.push({ members, probabilities });
    if (!uniform_soup) continue;
    const key = shardOutputKey(tenantId, placement, shard, "uniform-soup.safetensors");
    const model = buildModel(spec.model, data.shape, data.classes, 0);
    await writeWeights(ctx, model, { key, sizeBytes: (await ctx.store.stat(key))?.sizeBytes ?? 0 });
    elsewhere.uniformSoup = { model, accuracy: uniform_soup.accuracy };
  }
  return elsewhere;
}

/** A float32 array the store holds. */
async function readFloats(ctx: StoreContext, key: string): Promise<Float32Array> {
  const chunks: Buffer[] = [];
  for await (const chunk of await ctx.store.get(key)) chunks.push(chunk as Buffer);
  const bytes = Buffer.concat(chunks);
  return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}

/** The members' weights as safetensors, for their population. */
function weightsOf(members: Member[], jobId: string): MemberBytes[] {
  return members.map((m) => ({
    member: m.index,
    bytes: modelToSafetensors(m.model, { "papa.role": `member-${m.index}`, "papa.job": jobId }).bytes,
  }));
}

/** Writes the weights the population stored for a member into its model. */
async function writeWeights(
  ctx: StoreContext,
  model: tf.LayersModel,
  weights: Pick<StoredWeights, "key" | "sizeBytes">,
): Promise<void> {
  const source = storeSource(ctx.store, weights.key, weights.sizeBytes);
  await loadWeights(model, source, await readSafetensorsHeader(source, ctx.limits.maxSafetensorsHeaderBytes));
}

/** A shard whose averaging goes through its worker (`shardRequests`) and so through the population. */
function remoteShard(
  ctx: StoreContext,
  jobId: string,
  placement: Placement,
  request: TaskHooks["request"],
): Shard {
  const write = async (members: Member[], weights: StoredWeights[]) => {
    for (const w of weights) {
      const member = members.find((m) => m.index === w.member);
      if (member) await writeWeights(ctx, member.model, w);
    }
  };
  return {
    members: placement.members,
    async exchange(round, members) {
      const weights = weightsOf(members, jobId);
      await write(
        members,
        (await request({ kind: "exchange", round, weights } satisfies ShardRequest)) as StoredWeights[],
      );
    },
    async resume(members) {
      const point = (await request({
        kind: "resume",
        members: placement.members,
      } satisfies ShardRequest)) as ResumePoint | null;
      if (!point) return null;
      await write(members, point.weights);
      return point.round;
    },
  };
}
