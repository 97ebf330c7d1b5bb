import { Readable } from "node:stream";
import type * as tf from "@tensorflow/tfjs";
import { derivedId } from "../../ids.js";
import type { TaskHooks, TfjsOptions } from "../../jobs/tfjs-process.js";
import { selectBackend } from "../../ml/backend.js";
import { modelToSafetensors } from "../../ml/export.js";
import { trainPopulation } from "../../ml/population.js";
import { outputRow, storeOutput } from "../checkpoints/outputs.js";
import type { StoreContext } from "../context.js";
import { loadDataset } from "../datasets/datasets.js";
import { loadTrainingState, saveTrainingState, trainingStateKey } from "./state.js";
import { outputLabels, type TrainingTask, type TrainingTaskOutput, trainingSpecOf } from "./trainings.js";

/**
 * A training job's work, in the process of its own that runs it (`runTfjsTask`): trains the
 * population (resuming from the job's last saved epoch, saving each epoch), then stores every
 * member, the uniform soup and the greedy soup as safetensors with their TF.js topology. What it
 * returns is registered by the job's worker, with the job's success, in one transaction.
 */
export async function runTrainingTask(
  ctx: StoreContext,
  { job, source }: TrainingTask,
  options: TfjsOptions,
  { signal, progress }: TaskHooks,
): Promise<TrainingTaskOutput> {
  const { params } = job;
  const spec = trainingSpecOf(params);
  const models: tf.LayersModel[] = [];
  const started = performance.now();
  try {
    const backend = await selectBackend({ forced: options.backend });
    const data = await loadDataset(ctx.store, source, {
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
    const metrics = outputs.map((o) => ({
      id: derivedId(job.id, `metric-${o.label}`),
      checkpointId: o.id,
      dataset: params.dataset,
      split: "test",
      name: "accuracy",
      value: o.accuracy,
      jobId: job.id,
    }));
    return { result, rows, edges, metrics };
  } finally {
    for (const m of models) m.dispose();
  }
}
