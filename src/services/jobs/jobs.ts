import { and, count, desc, eq, inArray, isNotNull, isNull, lt } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import { QUEUE_NAMES, type QueuedJob, type QueueName } from "../../jobs/queue.js";
import { deleteOutputs } from "../checkpoints/outputs.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { ConflictError, isRequestError, NotFoundError, TooManyRequestsError } from "../errors.js";
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

/** How long a tenant whose queue is full is told to wait before it asks again. */
const FULL_QUEUE_RETRY_SECONDS = 30;

const ACTIVE: JobStatus[] = ["queued", "running"];

/**
 * Takes the tenant's lock for the rest of the transaction: its job admissions, dispatches and
 * finishes take turns, so that its counts of jobs hold while they are acted on.
 */
async function lockTenant(tx: Database, tenantId: string): Promise<void> {
  await tx
    .select({ id: schema.tenants.id })
    .from(schema.tenants)
    .where(eq(schema.tenants.id, tenantId))
    .for("update");
}

/**
 * Hands the tenant's oldest waiting jobs to the queue while it has fewer than
 * `maxRunningJobsPerTenant` there (queued for a worker, or running). So one tenant's backlog
 * waits in its own line, and another tenant's job reaches the queue, and a worker, behind at
 * most that many of each tenant's. Call it under `lockTenant`; wake the workers after the commit.
 */
async function dispatchWaiting(ctx: ServiceContext, tx: Database, tenantId: string): Promise<void> {
  const [dispatched] = await tx
    .select({ n: count() })
    .from(schema.jobs)
    .where(
      and(
        eq(schema.jobs.tenantId, tenantId),
        inArray(schema.jobs.status, ACTIVE),
        isNotNull(schema.jobs.dispatchedAt),
      ),
    );
  const free = ctx.limits.maxRunningJobsPerTenant - (dispatched?.n ?? 0);
  if (free <= 0) return;
  const waiting = await tx
    .select({ id: schema.jobs.id, kind: schema.jobs.kind })
    .from(schema.jobs)
    .where(
      and(
        eq(schema.jobs.tenantId, tenantId),
        eq(schema.jobs.status, "queued"),
        isNull(schema.jobs.dispatchedAt),
      ),
    )
    .orderBy(schema.jobs.id)
    .limit(free);
  for (const job of waiting) {
    await ctx.queue.enqueue(tx, job.kind as QueueName, job.id);
    await tx.update(schema.jobs).set({ dispatchedAt: new Date() }).where(eq(schema.jobs.id, job.id));
  }
}

/** Tells this process's workers that jobs may have been dispatched (after the commit). */
function wakeWorkers(ctx: ServiceContext): void {
  for (const queue of QUEUE_NAMES) ctx.queue.wake(queue);
}

/**
 * Records a job and dispatches it (`dispatchWaiting`) in one transaction: the job exists if and
 * only if its row committed. A tenant with `maxQueuedJobsPerTenant` jobs queued or running
 * already is refused (429). With an idempotency key, a repeated request returns the first job
 * (`created` false); the same key with different parameters is a conflict.
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
      await lockTenant(tx, principal.tenantId);
      const [active] = await tx
        .select({ n: count() })
        .from(schema.jobs)
        .where(and(eq(schema.jobs.tenantId, principal.tenantId), inArray(schema.jobs.status, ACTIVE)));
      const limit = ctx.limits.maxQueuedJobsPerTenant;
      if ((active?.n ?? 0) >= limit) {
        throw new TooManyRequestsError(
          `the tenant has ${active?.n} jobs queued or running, the most it may have; submit more as they finish`,
          FULL_QUEUE_RETRY_SECONDS,
          { limit },
        );
      }
      const [row] = await tx
        .insert(schema.jobs)
        .values({ id: newId(), tenantId: principal.tenantId, kind, params, idempotencyKey })
        .returning();
      if (!row) throw new Error("job insert returned no row");
      await dispatchWaiting(ctx, tx, principal.tenantId);
      return row;
    });
    wakeWorkers(ctx);
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

/**
 * A job of the tenant (404 otherwise) and a subscription to its changes for an event stream
 * (`JobWatch`: 429 when the tenant has its most streams open). Call `stop` when the stream ends.
 */
export async function followJob({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string; onChange: (job: Job) => void }>): Promise<{ job: Job; stop(): void }> {
  const job = await getJob({ ctx, principal, input });
  return { job, stop: ctx.jobWatch.follow(job, input.onChange) };
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
  const updated = await finishJob(ctx, job, { status: "canceled" }, { from: ACTIVE });
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

type Outcome =
  | { status: "succeeded"; result: object }
  | { status: "failed"; problem: JobProblem }
  | { status: "queued"; problem: JobProblem }
  | { status: "canceled" };

/**
 * Moves a job in one of the `from` statuses (default: running) to `outcome`, or returns null,
 * changing nothing (canceled or finished meanwhile), with `register` (the rows that commit with a
 * success) in the same transaction. A job that leaves the queue for good frees a slot of its
 * tenant's (`dispatchWaiting`).
 */
async function finishJob(
  ctx: ServiceContext,
  job: { id: string; tenantId: string },
  outcome: Outcome,
  options: { register?: (tx: Database) => Promise<void>; from?: JobStatus[] } = {},
): Promise<Job | null> {
  const { register, from = ["running"] } = options;
  const finished = await ctx.db.transaction(async (tx) => {
    await lockTenant(tx, job.tenantId);
    const [row] = await tx
      .update(schema.jobs)
      .set({
        status: outcome.status,
        progress: outcome.status === "succeeded" ? 1 : undefined,
        result: outcome.status === "succeeded" ? outcome.result : null,
        problem: "problem" in outcome ? outcome.problem : null,
        finishedAt: outcome.status === "queued" ? null : new Date(),
        updatedAt: new Date(),
      })
      .where(and(eq(schema.jobs.id, job.id), inArray(schema.jobs.status, from)))
      .returning();
    if (!row) return null;
    await register?.(tx);
    if (outcome.status !== "queued") await dispatchWaiting(ctx, tx, job.tenantId);
    return row;
  });
  wakeWorkers(ctx);
  return finished;
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
export async function failAbandonedJob(ctx: ServiceContext, id: string, kind: JobRules): Promise<void> {
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
