import type { WorkerConfig } from "../config.js";
import { selectBackend } from "../ml/backend.js";
import { expireUploadSessions } from "../services/checkpoints/upload-sessions.js";
import type { ServiceContext } from "../services/context.js";
import { abandonMergeJob, runMergeJob } from "../services/merges/merges.js";
import { abandonTrainingJob, runTrainingJob } from "../services/trainings/trainings.js";

/** Consumes the configured queues in this process until `ctx.queue.stop()`. */
export async function startWorker(ctx: ServiceContext, config: WorkerConfig): Promise<void> {
  // What writers that died left behind, and upload sessions past their expiry: now and periodically.
  ctx.queue.repeat("sweeping abandoned writes", config.sweepIntervalSeconds * 1000, async () => {
    const swept = await ctx.store.sweepIncomplete(config.abandonedWriteSeconds);
    if (swept > 0) ctx.logger.info("removed writes of writers that died", { count: swept });
    const expired = await expireUploadSessions(ctx);
    if (expired > 0) ctx.logger.info("aborted expired upload sessions", { count: expired });
  });
  for (const queue of config.queues) {
    if (queue === "merge") {
      const options = {
        threads: config.mergeThreads,
        backend: config.backend,
        fashionMnistDir: config.fashionMnistDir,
      };
      await ctx.queue.work("merge", config.mergeConcurrency, (job) => runMergeJob(ctx, job, options));
      await ctx.queue.workAbandoned("merge", (id) => abandonMergeJob(ctx, id));
    } else {
      // TensorFlow.js has one backend and one memory per process: one training at a time.
      // Loaded now, so a missing forced backend stops the worker at start and /readyz shows it.
      const backend = await selectBackend({ forced: config.backend });
      ctx.logger.info("training backend", { backend });
      await ctx.queue.work("train", 1, (job) =>
        runTrainingJob(ctx, job, { backend: config.backend, fashionMnistDir: config.fashionMnistDir }),
      );
      await ctx.queue.workAbandoned("train", (id) => abandonTrainingJob(ctx, id));
    }
  }
  ctx.logger.info("worker started", { queues: config.queues });
}
