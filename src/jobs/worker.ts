import type { WorkerConfig } from "../config.js";
import { MergePool } from "../merge/pool.js";
import { warmPlanner } from "../merge/preflight.js";
import type { BackendName } from "../ml/backend.js";
import { expireUploadSessions } from "../services/checkpoints/upload-sessions.js";
import type { ServiceContext } from "../services/context.js";
import { mergeJob } from "../services/merges/merge-job.js";
import { closeDueRounds } from "../services/populations/rounds.js";
import { trainingJob } from "../services/trainings/trainings.js";
import { runTfjsTask, tfjsEnvironment } from "./tfjs-process.js";

/** Consumes the configured queues in this process until `ctx.queue.stop()`. */
export async function startWorker(ctx: ServiceContext, config: WorkerConfig): Promise<void> {
  // What writers that died left behind, and upload sessions past their expiry: now and periodically.
  ctx.queue.repeat("sweeping abandoned writes", config.sweepIntervalSeconds * 1000, async () => {
    const swept = await ctx.store.sweepIncomplete(config.abandonedWriteSeconds);
    if (swept > 0) ctx.logger.info("removed writes of writers that died", { count: swept });
    const expired = await expireUploadSessions(ctx);
    if (expired > 0) ctx.logger.info("aborted expired upload sessions", { count: expired });
  });
  ctx.queue.repeat("closing rounds past their timeout", config.roundCheckSeconds * 1000, async () => {
    const closed = await closeDueRounds(ctx);
    if (closed > 0) ctx.logger.info("closed rounds past their timeout", { count: closed });
  });
  for (const queue of config.queues) {
    if (queue === "merge") {
      // One set of merge threads for the process, shared by its merge jobs, and the planning
      // thread started: a job does not pay for starting threads.
      const pool = new MergePool(config.mergeThreads);
      warmPlanner();
      ctx.queue.afterStop(() => pool.close());
      const options = {
        pool,
        backend: config.backend,
        fashionMnistDir: config.fashionMnistDir,
      };
      await ctx.queue.work("merge", config.mergeConcurrency, (job) => mergeJob.run(ctx, job, options));
      await ctx.queue.workAbandoned("merge", (id) => mergeJob.abandon(ctx, id));
    } else {
      // Each training runs in a process of its own; a probe now tells whether they can. A worker
      // whose backend cannot run takes no training (others may), and /readyz says why.
      const options = { backend: config.backend, fashionMnistDir: config.fashionMnistDir };
      try {
        ctx.trainer.backend = await runTfjsTask<BackendName>(
          { kind: "probe" },
          tfjsEnvironment(ctx, options),
        );
        ctx.logger.info("training backend", { backend: ctx.trainer.backend });
      } catch (err) {
        ctx.trainer.problem = (err as Error).message;
        ctx.logger.error("the training backend cannot run; this worker takes no training", { error: err });
        continue;
      }
      await ctx.queue.work("train", config.trainConcurrency, (job) => trainingJob.run(ctx, job, options));
      await ctx.queue.workAbandoned("train", (id) => trainingJob.abandon(ctx, id));
    }
  }
  ctx.logger.info("worker started", { queues: config.queues });
}
