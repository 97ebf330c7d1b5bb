import { and, count, eq, inArray, isNotNull, isNull } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";
import { QUEUE_NAMES, type QueueName } from "../../jobs/queue.js";
import type { ServiceContext } from "../context.js";
import type { Job, JobProblem, JobStatus } from "./jobs.js";

// A job's way through its tenant's line: admitted under the tenant's lock, dispatched to the
// queue a few at a time (`dispatchWaiting`), finished (`finishJob`), which frees a slot.

/** The statuses of a job that counts against its tenant's limits. */
export const ACTIVE: JobStatus[] = ["queued", "running"];

/**
 * Takes the tenant's lock for the rest of the transaction: its job admissions, dispatches and
 * finishes take turns, so that its counts of jobs hold while they are acted on.
 */
export async function lockTenant(tx: Database, tenantId: string): Promise<void> {
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
export async function dispatchWaiting(ctx: ServiceContext, tx: Database, tenantId: string): Promise<void> {
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
export function wakeWorkers(ctx: ServiceContext): void {
  for (const queue of QUEUE_NAMES) ctx.queue.wake(queue);
}

export type Outcome =
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
export async function finishJob(
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
  if (finished) ctx.jobWatch.finished();
  return finished;
}

/**
 * Where a job keeps objects that serve only its attempts (a training's last completed epoch):
 * none are left once the job is finished or canceled.
 */
export function jobScratchPrefix(job: { tenantId: string; id: string }): string {
  return `tenants/${job.tenantId}/jobs/${job.id}/`;
}

export async function deleteScratch(
  ctx: ServiceContext,
  job: { tenantId: string; id: string },
): Promise<void> {
  for (const key of await ctx.store.list(jobScratchPrefix(job))) await ctx.store.delete(key);
}
