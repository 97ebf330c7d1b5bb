import { and, count, desc, eq, inArray, lt, sql } from "drizzle-orm";
import { type Database, preparedQuery, schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import type { QueueName } from "../../jobs/queue.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { ConflictError, NotFoundError, TooManyRequestsError } from "../errors.js";
import { type Page, pageByIdDesc } from "../pagination.js";
import { placementOf } from "../trainings/shards.js";
import { ACTIVE, deleteScratch, dispatchWaiting, finishJob, lockTenant, wakeWorkers } from "./lifecycle.js";

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
      return admitJob(ctx, tx, principal.tenantId, { kind, params, idempotencyKey });
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

/**
 * Records a job inside the caller's transaction, under its tenant's lock, and dispatches the
 * tenant's waiting jobs; wake the workers after the commit (`wakeWorkers`). No quota applies:
 * `createJob` checks it for requests; work the service owes (a population's round) is admitted.
 * `now`: the job goes to the queue at once, past the tenant's line (a round's merge, which the
 * tenant's running jobs may be waiting for).
 */
export async function admitJob(
  ctx: ServiceContext,
  tx: Database,
  tenantId: string,
  job: { id?: string; kind: JobKind; params: object; idempotencyKey?: string | undefined },
  options: { now?: boolean } = {},
): Promise<Job> {
  await lockTenant(tx, tenantId);
  const [row] = await tx
    .insert(schema.jobs)
    .values({ ...job, id: job.id ?? newId(), tenantId, dispatchedAt: options.now ? new Date() : null })
    .returning();
  if (!row) throw new Error("job insert returned no row");
  if (options.now) await ctx.queue.enqueue(tx, row.kind as QueueName, row.id);
  await dispatchWaiting(ctx, tx, tenantId);
  return row;
}

const jobOfTenant = preparedQuery((db) =>
  db
    .select()
    .from(schema.jobs)
    .where(
      and(eq(schema.jobs.id, sql.placeholder("id")), eq(schema.jobs.tenantId, sql.placeholder("tenantId"))),
    )
    .prepare("job_of_tenant"),
);

export async function getJob({ ctx, principal, input }: TenantCall<{ id: string }>): Promise<Job> {
  const [job] = await jobOfTenant(ctx.db).execute({ id: input.id, tenantId: principal.tenantId });
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
  // The lead of a placed training takes its other shards with it.
  const placement = job.kind === "train" ? placementOf(job) : null;
  for (const id of placement?.shard === 0 ? placement.jobIds.slice(1) : []) {
    await cancelJob({ ctx, principal, input: { id } }).catch((err: unknown) => {
      if (!(err instanceof ConflictError || err instanceof NotFoundError)) throw err;
    });
  }
  return updated;
}

/** The job's status now (a worker checks it to notice a cancel). */
export async function jobStatus(ctx: ServiceContext, id: string): Promise<JobStatus> {
  const [row] = await ctx.db
    .select({ status: schema.jobs.status })
    .from(schema.jobs)
    .where(eq(schema.jobs.id, id));
  return row?.status ?? "canceled";
}
