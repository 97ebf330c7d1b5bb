import type * as tf from "@tensorflow/tfjs";
import type { TaskHooks, TfjsOptions } from "../../jobs/tfjs-process.js";
import { averageMembers, reestimateBatchNorm } from "../../ml/averaging.js";
import { selectBackend } from "../../ml/backend.js";
import { calibrationBatches, evaluate } from "../../ml/evaluation.js";
import { modelToSafetensors, type TfjsTopology } from "../../ml/export.js";
import { modelFromCheckpoint } from "../../ml/import.js";
import { CALIBRATION_BATCHES } from "../../ml/population.js";
import { streamSeed } from "../../random.js";
import { readSafetensorsHeader, storeSource } from "../../tensors/source.js";
import { outputRow, storeOutput } from "../checkpoints/outputs.js";
import type { StoreContext } from "../context.js";
import { loadDataset } from "../datasets/datasets.js";
import { InvalidInputError } from "../errors.js";
import type { EvaluationTask } from "./evaluated-merge.js";
import type { MergeOutputs } from "./merge-job.js";

/**
 * The evaluated merge of models this service trained, in the process of its own that runs it
 * (`runTfjsTask`): the inputs are rebuilt as TF.js models, averaged in place with the same
 * coefficient plan, each output's BatchNorm statistics are re-estimated on training batches
 * drawn at random (`calibrationBatches`) and
 * its test accuracy measured, then it is stored with its topology.
 */
export async function runEvaluationTask(
  ctx: StoreContext,
  task: EvaluationTask,
  options: TfjsOptions,
  hooks: TaskHooks,
): Promise<MergeOutputs> {
  const { job, params, inputs, coefficients, ids } = task;
  const evaluation = params.evaluate;
  if (!evaluation) throw new Error("not an evaluated merge");
  await selectBackend({ forced: options.backend });
  const data = await loadDataset(ctx.store, task.source, {
    fashionMnistDir: options.fashionMnistDir,
    maxTrain: evaluation.max_train_examples,
    maxTest: evaluation.max_test_examples,
  });
  const models: tf.LayersModel[] = [];
  const calibration = calibrationBatches(
    data.train,
    data.shape,
    128,
    CALIBRATION_BATCHES,
    streamSeed(0, "calibration"),
  );
  try {
    for (const c of inputs) {
      const source = storeSource(ctx.store, c.storageKey, c.sizeBytes);
      const header = await readSafetensorsHeader(source, ctx.limits.maxSafetensorsHeaderBytes);
      models.push(await modelFromCheckpoint(c.topology as TfjsTopology, source, header));
    }
    const expected = models[0]?.inputs[0]?.shape.slice(1).join(",");
    if (expected !== data.shape.join(",")) {
      throw new InvalidInputError(
        `the models take inputs [${expected}], ${evaluation.dataset} has [${data.shape}]`,
      );
    }
    hooks.progress(0.3);
    averageMembers(models, coefficients);
    const rows: ReturnType<typeof outputRow>[] = [];
    const accuracies: number[] = [];
    for (const [j, id] of ids.entries()) {
      hooks.signal.throwIfAborted();
      const child = models[j] as tf.LayersModel;
      reestimateBatchNorm(child, calibration);
      accuracies.push(evaluate(child, data.test, data.shape));
      const { bytes, topology } = modelToSafetensors(child, {
        "papa.method": params.method,
        "papa.job": job.id,
      });
      const summary = await storeOutput(ctx, job.tenantId, id, bytes);
      rows.push(
        outputRow({
          id,
          tenantId: job.tenantId,
          name: task.names[j] as string,
          jobId: job.id,
          summary,
          topology,
        }),
      );
      hooks.progress(0.3 + (0.7 * (j + 1)) / ids.length);
    }
    return { rows, accuracies };
  } finally {
    for (const b of calibration) b.dispose();
    for (const m of models) m.dispose();
  }
}
