import { and, eq, inArray } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";
import type { QueuedJob } from "../../jobs/queue.js";
import { deleteOutputs } from "../checkpoints/outputs.js";
import type { ServiceContext } from "../context.js";
import { isRequestError } from "../errors.js";
import { type Job, type JobProblem, type JobStatus, jobStatus } from "./jobs.js";
import { ACTIVE, deleteScratch, finishJob } from "./lifecycle.js";

/**
 * Marks a job running for an attempt. Returns null when there is nothing to do: the job was
 * canceled, or an earlier attempt already finished it (a retry after a crash).
 */
async function startJobAttempt(ctx: ServiceContext, id: string): Promise<Job | null> {
  const [job] = await ctx.db
    .update(schema.jobs)
    .set({ status: "running", startedAt: new Date(), updatedAt: new Date() })
    .where(and(eq(schema.jobs.id, id), inArray(schema.jobs.status, ["queued", "running"])))
    .returning();
  return job ?? null;
}

/** Records progress (0..1, and optional details) and returns the job's status, so a worker notices a cancel. */
async function reportProgress(
  ctx: ServiceContext,
  id: string,
  progress: number,
  detail?: Record<string, number>,
): Promise<JobStatus> {
  const [row] = await ctx.db
    .update(schema.jobs)
    .set({ progress, ...(detail ? { progressDetail: detail } : {}), updatedAt: new Date() })
    .where(and(eq(schema.jobs.id, id), eq(schema.jobs.status, "running")))
    .returning({ status: schema.jobs.status });
  return row ? row.status : jobStatus(ctx, id);
}

/**
 * A progress callback for a worker's hot loop: records at most every `intervalMs`, without
 * waiting, and aborts `abort` when it finds the job canceled.
 */
function progressReporter(
  ctx: ServiceContext,
  id: string,
  abort: AbortController,
  intervalMs: number,
): (fraction: number, detail?: Record<string, number>) => void {
  let last = 0;
  return (fraction, detail) => {
    if (Date.now() - last < intervalMs) return;
    last = Date.now();
    reportProgress(ctx, id, fraction, detail).then(
      (status) => status === "canceled" && abort.abort(new Error("canceled")),
      () => undefined,
    );
  };
}

function jobProblem(title: string, detail: string): JobProblem {
  return { type: `urn:papa:problem:${title.toLowerCase().replaceAll(" ", "-")}`, title, detail };
}

/**
 * Settles an attempt that threw, for a job not canceled: a permanent failure fails the job (no
 * retry) with its message; anything else marks it queued for the queue's retry, or failed on the
 * last attempt, with a problem that says which it is, and rethrows so that pg-boss retries it.
 * (A cancel meanwhile wins: `finishJob` changes only a running job.)
 */
async function settleFailedAttempt(
  ctx: ServiceContext,
  queued: QueuedJob,
  job: Job,
  err: unknown,
  failure: { permanent: boolean; title: string },
): Promise<void> {
  if (failure.permanent) {
    const problem = jobProblem(failure.title, (err as Error).message);
    await finishJob(ctx, job, { status: "failed", problem });
    return;
  }
  const attempt = queued.retryCount + 1;
  ctx.logger.error("job attempt failed", { job_id: queued.id, attempt, error: err });
  const last = queued.retryCount >= queued.retryLimit;
  const problem = jobProblem(
    failure.title,
    `attempt ${attempt} of ${queued.retryLimit + 1} failed; it ${last ? "will not be" : "will be"} retried`,
  );
  await finishJob(ctx, job, last ? { status: "failed", problem } : { status: "queued", problem });
  throw err;
}

/** How the runner treats one kind of job. */
export interface JobRules {
  /** The title of a failed job's problem. */
  title: string;
  progressIntervalMs: number;
  /** The errors that no retry can mend. */
  isPermanent(err: unknown): boolean;
  /**
   * The ids of every output checkpoint the job's attempts may store, deleted when an attempt
   * does not commit (more ids than it stores are fine: deleting a missing object is not an error).
   */
  outputIds(job: Job): string[];
}

/** What the runner gives an attempt's work. */
export interface JobAttempt {
  job: Job;
  /** Aborted when the queue stops the job, or when a progress report finds it canceled. */
  signal: AbortSignal;
  /** Records progress (0..1, optional details) at most every `progressIntervalMs`, without waiting. */
  progress(fraction: number, detail?: Record<string, number>): void;
}

/** A finished attempt's result, and the rows that commit with it. */
export interface AttemptOutcome {
  result: object;
  register(tx: Database): Promise<void>;
}

/**
 * Runs one attempt of a queued job, the same way for every kind of job: marks the job running
 * (returns if there is nothing to do), runs `work`, and commits its result and rows with the
 * job's success in one transaction. The outputs of an attempt that threw, or whose job was
 * canceled before the commit, are deleted; then the failure is settled (`settleFailedAttempt`).
 * The job's scratch objects are deleted before the commit (a crash in between costs a retry its
 * resume point, not its result), and after a failure unless the job will be retried.
 */
async function runJobAttempt(
  ctx: ServiceContext,
  queued: QueuedJob,
  kind: JobRules,
  work: (attempt: JobAttempt) => Promise<AttemptOutcome>,
): Promise<void> {
  const job = await startJobAttempt(ctx, queued.id);
  if (!job) return;
  const abort = new AbortController();
  const onStop = () => abort.abort(queued.signal.reason);
  queued.signal.addEventListener("abort", onStop);
  try {
    const progress = progressReporter(ctx, job.id, abort, kind.progressIntervalMs);
    const outcome = await work({ job, signal: abort.signal, progress });
    await deleteScratch(ctx, job);
    const committed = await finishJob(
      ctx,
      job,
      { status: "succeeded", result: outcome.result },
      { register: outcome.register },
    );
    if (!committed) await deleteOutputs(ctx, job.tenantId, kind.outputIds(job));
  } catch (err) {
    await deleteOutputs(ctx, job.tenantId, kind.outputIds(job));
    const permanent = kind.isPermanent(err) || isRequestError(err);
    const canceled = (await jobStatus(ctx, queued.id)) === "canceled";
    if (canceled || permanent || queued.retryCount >= queued.retryLimit) await deleteScratch(ctx, job);
    if (!canceled) await settleFailedAttempt(ctx, queued, job, err, { permanent, title: kind.title });
  } finally {
    queued.signal.removeEventListener("abort", onStop);
  }
}

/**
 * Fails a job whose attempts are all spent without one settling it - each attempt's worker died,
 * or ran past the queue's expiry - and deletes what those attempts stored: its outputs and its
 * scratch. A job that is finished or canceled is left as it is. (The queue hands such jobs to
 * `JobQueue.workAbandoned`.)
 */
async function failAbandonedJob(ctx: ServiceContext, id: string, kind: JobRules): Promise<void> {
  const problem = jobProblem(
    kind.title,
    "every attempt stopped before it finished: its worker was killed, or ran past the queue's expiry",
  );
  const [found] = await ctx.db
    .select({ id: schema.jobs.id, tenantId: schema.jobs.tenantId })
    .from(schema.jobs)
    .where(eq(schema.jobs.id, id));
  const job = found && (await finishJob(ctx, found, { status: "failed", problem }, { from: ACTIVE }));
  if (!job) return;
  ctx.logger.error("job abandoned: its attempts are spent", { job_id: id });
  await deleteOutputs(ctx, job.tenantId, kind.outputIds(job));
  await deleteScratch(ctx, job);
}

/** A queue's two handlers for one kind of job. */
export interface JobHandlers<O> {
  /** Runs one attempt (`runJobAttempt`). */
  run(ctx: ServiceContext, queued: QueuedJob, options: O): Promise<void>;
  /** Fails a job whose attempts are all spent (`failAbandonedJob`). */
  abandon(ctx: ServiceContext, id: string): Promise<void>;
}

/** The handlers of a kind of job whose attempt's work is `attempt`. */
export function jobHandlers<O>(
  rules: JobRules,
  attempt: (ctx: ServiceContext, jobAttempt: JobAttempt, options: O) => Promise<AttemptOutcome>,
): JobHandlers<O> {
  return {
    run: (ctx, queued, options) => runJobAttempt(ctx, queued, rules, (a) => attempt(ctx, a, options)),
    abandon: (ctx, id) => failAbandonedJob(ctx, id, rules),
  };
}
