import { createJsonLogger } from "../logger.js";
import { isRequestError } from "../services/errors.js";
import { openStore } from "../storage/open-store.js";
import type { ChildMessage, ParentMessage, TfjsEnvironment, TfjsTask } from "./tfjs-process.js";

/**
 * A process that runs one TensorFlow.js task for its parent (`runTfjsTask`), then exits. The
 * parent's database stays the parent's: the task works with the store and reports back.
 */
const abort = new AbortController();

function send(message: ChildMessage): Promise<void> {
  return new Promise((resolve) => process.send?.(message, () => resolve()) ?? resolve());
}

/** The requests sent to the parent that await its response, by id. */
const pending = new Map<number, { resolve(body: unknown): void; reject(err: Error): void }>();
let lastRequest = 0;

function request(body: unknown): Promise<unknown> {
  const id = ++lastRequest;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    void send({ type: "request", id, body });
  });
}

async function run(task: TfjsTask, environment: TfjsEnvironment): Promise<unknown> {
  const { BackendError, selectBackend } = await import("../ml/backend.js");
  if (task.kind === "probe") return selectBackend({ forced: environment.backend, check: true });
  const store = openStore(environment.store);
  const ctx = { store, limits: environment.limits, logger: createJsonLogger(environment.logLevel) };
  const hooks = {
    signal: abort.signal,
    progress: (fraction: number, detail?: Record<string, number>) =>
      void send({ type: "progress", fraction, ...(detail ? { detail } : {}) }),
    request,
  };
  try {
    if (task.kind === "train") {
      const { runTrainingTask } = await import("../services/trainings/training-task.js");
      return await runTrainingTask(
        ctx,
        task.input as Parameters<typeof runTrainingTask>[1],
        environment,
        hooks,
      );
    }
    const { runEvaluationTask } = await import("../services/merges/evaluation-task.js");
    return await runEvaluationTask(
      ctx,
      task.input as Parameters<typeof runEvaluationTask>[1],
      environment,
      hooks,
    );
  } catch (err) {
    const { DatasetError } = await import("../ml/dataset-formats.js");
    const { DivergenceError } = await import("../ml/population.js");
    const { CheckpointImportError } = await import("../ml/import.js");
    const permanent = [BackendError, DatasetError, DivergenceError, CheckpointImportError].some(
      (type) => err instanceof type,
    );
    const decided = (err as { permanent?: boolean }).permanent === true;
    throw Object.assign(err as Error, { permanent: permanent || decided || isRequestError(err) });
  } finally {
    store.close();
  }
}

process.on("message", (message: ParentMessage) => {
  if (message.type === "abort") {
    abort.abort(new Error("aborted by the worker"));
    return;
  }
  if (message.type === "response") {
    const waiting = pending.get(message.id);
    pending.delete(message.id);
    if (message.error) {
      const { name, message: text, permanent } = message.error;
      waiting?.reject(Object.assign(new Error(text), { name, permanent }));
    } else {
      waiting?.resolve(message.body);
    }
    return;
  }
  run(message.task, message.environment)
    .then(
      (result) => send({ type: "done", result }),
      (err: Error & { permanent?: boolean }) =>
        send({
          type: "failed",
          error: { name: err.name, message: err.message, permanent: err.permanent ?? false },
        }),
    )
    .finally(() => process.exit(0));
});
