import { and, desc, eq, inArray, lt } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import type { QueuedJob, QueueName } from "../../jobs/queue.js";
import { deleteOutputs } from "../checkpoints/outputs.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { ConflictError, isRequestError, NotFoundError } from "../errors.js";
import { type Page, pageByIdDesc } from "../pagination.js";

export type JobStatus = (typeof schema.jobStatus.enumValues)[number];
export type JobKind = (typeof schema.jobKind.enumValues)[number];
export const FINISHED: JobStatus[] = ["succeeded", "failed", "canceled"];

/** An RFC 9457-style description of why a job failed. */
export interface JobProblem {
  type: string;
  title: string;
  detail: string;
}

export type Job = typeof schema.jobs.$inferSelect;

/** JSON with object keys sorted at every level: jsonb does not keep key order. */
function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) =>
    v && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : v,
  );
}

/**
 * Records a job and enqueues it in one transaction: the job exists if and only if its row
 * committed. With an idempotency key, a repeated request returns the first job (`created`
 * false); the same key with different parameters is a conflict.
 */
export async function createJob({
  ctx,
  principal,
  input,
}: TenantCall<{ kind: JobKind; params: object; idempotencyKey?: string | undefined }>): Promise<{
  job: Job;
  created: boolean;
}> {
  const { kind, params, idempotencyKey } = input;
  const replay = async (): Promise<{ job: Job; created: boolean } | null> => {
    if (idempotencyKey === undefined) return null;
    const [existing] = await ctx.db
      .select()
      .from(schema.jobs)
      .where(
        and(eq(schema.jobs.tenantId, principal.tenantId), eq(schema.jobs.idempotencyKey, idempotencyKey)),
      );
    if (!existing) return null;
    if (existing.kind !== kind || canonicalJson(existing.params) !== canonicalJson(params)) {
      throw new ConflictError(
        `Idempotency-Key ${idempotencyKey} was used for a different request (job ${existing.id})`,
      );
    }
    return { job: existing, created: false };
  };
  const earlier = await replay();
  if (earlier) return earlier;
  try {
    const job = await ctx.db.transaction(async (tx) => {
      const [row] = await tx
        .insert(schema.jobs)
        .values({ id: newId(), tenantId: principal.tenantId, kind, params, idempotencyKey })
        .returning();
      if (!row) throw new Error("job insert returned no row");
      await ctx.queue.enqueue(tx, kind as QueueName, row.id);
      return row;
    });
    ctx.queue.wake(kind as QueueName);
    return { job, created: true };
  } catch (err) {
    // Two requests with one key raced; the unique index let one in.
    const raced = await replay();
    if (raced) return raced;
    throw err;
  }
}

export async function getJob({ ctx, principal, input }: TenantCall<{ id: string }>): Promise<Job> {
  const [job] = await ctx.db
    .select()
    .from(schema.jobs)
    .where(and(eq(schema.jobs.id, input.id), eq(schema.jobs.tenantId, principal.tenantId)));
  if (!job) throw new NotFoundError(`job ${input.id} not found`);
  return job;
}

export async function listJobs({
  ctx,
  principal,
  input,
}: TenantCall<{
  limit: number;
  cursor?: string | undefined;
  status?: JobStatus[] | undefined;
  kind?: JobKind | undefined;
}>): Promise<Page<Job>> {
  return pageByIdDesc(input, (before, take) =>
    ctx.db
      .select()
      .from(schema.jobs)
      .where(
        and(
          eq(schema.jobs.tenantId, principal.tenantId),
          input.status?.length ? inArray(schema.jobs.status, input.status) : undefined,
          input.kind ? eq(schema.jobs.kind, input.kind) : undefined,
          before ? lt(schema.jobs.id, before) : undefined,
        ),
      )
      .orderBy(desc(schema.jobs.id))
      .limit(take),
  );
}

/**
 * Cancels a job. A queued job is removed from the queue; a running one is marked canceled and
 * its worker stops at its next progress check, registering nothing. Finished jobs cannot be
 * canceled (409); canceling a canceled job is a no-op.
 */
export async function cancelJob({ ctx, principal, input }: TenantCall<{ id: string }>): Promise<Job> {
  const job = await getJob({ ctx, principal, input });
  if (job.status === "canceled") return job;
  if (FINISHED.includes(job.status)) throw new ConflictError(`job ${job.id} already ${job.status}`);
  const [updated] = await ctx.db
    .update(schema.jobs)
    .set({ status: "canceled", finishedAt: new Date(), updatedAt: new Date() })
    .where(and(eq(schema.jobs.id, job.id), inArray(schema.jobs.status, ["queued", "running"])))
    .returning();
  if (!updated)
    return getJob({ ctx, principal, input }).then((j) =>
      j.status === "canceled" ? j : cancelJob({ ctx, principal, input }),
    );
  await ctx.queue.cancel(job.kind as QueueName, job.id);
  // A job queued for its retry has no worker to delete its scratch; a running one's worker
  // deletes again what it writes after this.
  await deleteScratch(ctx, updated);
  return updated;
}

// ---- for workers ----

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

/** The job's status now (a worker checks it to notice a cancel). */
export async function jobStatus(ctx: ServiceContext, id: string): Promise<JobStatus> {
  const [row] = await ctx.db
    .select({ status: schema.jobs.status })
    .from(schema.jobs)
    .where(eq(schema.jobs.id, id));
  return row?.status ?? "canceled";
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

/**
 * Finishes a running job inside `tx` (with whatever else must commit with it). Returns false,
 * changing nothing, when the job is no longer running (canceled meanwhile).
 */
async function finishJob(
  tx: Database,
  id: string,
  outcome:
    | { status: "succeeded"; result: object }
    | { status: "failed"; problem: JobProblem }
    | { status: "queued"; problem: JobProblem },
): Promise<boolean> {
  const [row] = await tx
    .update(schema.jobs)
    .set({
      status: outcome.status,
      progress: outcome.status === "succeeded" ? 1 : undefined,
      result: outcome.status === "succeeded" ? outcome.result : null,
      problem: outcome.status === "succeeded" ? null : outcome.problem,
      finishedAt: outcome.status === "queued" ? null : new Date(),
      updatedAt: new Date(),
    })
    .where(and(eq(schema.jobs.id, id), eq(schema.jobs.status, "running")))
    .returning({ id: schema.jobs.id });
  return row !== undefined;
}

function jobProblem(title: string, detail: string): JobProblem {
  return { type: `urn:papa:problem:${title.toLowerCase().replaceAll(" ", "-")}`, title, detail };
}

/**
 * Settles an attempt that threw, for a job not canceled: a permanent failure fails the job (no
 * retry) with its message; anything else marks it queued for the queue's retry, or failed on the
 * last attempt, with a problem that says which it is, and rethrows so that pg-boss retries it. (A cancel meanwhile wins: `finishJob` changes only a
 * running job.)
 */
async function settleFailedAttempt(
  ctx: ServiceContext,
  queued: QueuedJob,
  err: unknown,
  failure: { permanent: boolean; title: string },
): Promise<void> {
  if (failure.permanent) {
    const problem = jobProblem(failure.title, (err as Error).message);
    await finishJob(ctx.db, queued.id, { status: "failed", problem });
    return;
  }
  const attempt = queued.retryCount + 1;
  ctx.logger.error("job attempt failed", { job_id: queued.id, attempt, error: err });
  const last = queued.retryCount >= queued.retryLimit;
  const problem = jobProblem(
    failure.title,
    `attempt ${attempt} of ${queued.retryLimit + 1} failed; it ${last ? "will not be" : "will be"} retried`,
  );
  await finishJob(ctx.db, queued.id, last ? { status: "failed", problem } : { status: "queued", problem });
  throw err;
}

/**
 * Where a job keeps objects that serve only its attempts (a training's last completed epoch):
 * none are left once the job is finished or canceled.
 */
export function jobScratchPrefix(job: { tenantId: string; id: string }): string {
  return `tenants/${job.tenantId}/jobs/${job.id}/`;
}

async function deleteScratch(ctx: ServiceContext, job: { tenantId: string; id: string }): Promise<void> {
  for (const key of await ctx.store.list(jobScratchPrefix(job))) await ctx.store.delete(key);
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
export async function runJobAttempt(
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
    const committed = await ctx.db.transaction(async (tx) => {
      if (!(await finishJob(tx, job.id, { status: "succeeded", result: outcome.result }))) return false;
      await outcome.register(tx);
      return true;
    });
    if (!committed) await deleteOutputs(ctx, job.tenantId, kind.outputIds(job));
  } catch (err) {
    await deleteOutputs(ctx, job.tenantId, kind.outputIds(job));
    const permanent = kind.isPermanent(err) || isRequestError(err);
    const canceled = (await jobStatus(ctx, queued.id)) === "canceled";
    if (canceled || permanent || queued.retryCount >= queued.retryLimit) await deleteScratch(ctx, job);
    if (!canceled) await settleFailedAttempt(ctx, queued, err, { permanent, title: kind.title });
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
export async function failAbandonedJob(ctx: ServiceContext, id: string, kind: JobRules): Promise<void> {
  const problem = jobProblem(
    kind.title,
    "every attempt stopped before it finished: its worker was killed, or ran past the queue's expiry",
  );
  const [job] = await ctx.db
    .update(schema.jobs)
    .set({ status: "failed", problem, finishedAt: new Date(), updatedAt: new Date() })
    .where(and(eq(schema.jobs.id, id), inArray(schema.jobs.status, ["queued", "running"])))
    .returning();
  if (!job) return;
  ctx.logger.error("job abandoned: its attempts are spent", { job_id: id });
  await deleteOutputs(ctx, job.tenantId, kind.outputIds(job));
  await deleteScratch(ctx, job);
}
