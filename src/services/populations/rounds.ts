import type { Readable } from "node:stream";
import { and, asc, eq, isNull, sql } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";
import { roundCoefficients } from "../../merge/methods.js";
import { checkMergeOffThread } from "../../merge/preflight.js";
import { streamSeed } from "../../random.js";
import { checkpointKey, createCheckpoint } from "../checkpoints/checkpoints.js";
import { assertPopulationMember } from "../checkpoints/files.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { ConflictError, InvalidInputError, NotFoundError, NotReadyError } from "../errors.js";
import { admitJob } from "../jobs/jobs.js";
import { lockTenant, wakeWorkers } from "../jobs/lifecycle.js";
import {
  loadInputs,
  type MergeParams,
  type PopulationMerge,
  planArguments,
  preflight,
} from "../merges/merges.js";
import { type PopulationRow, populationRow, type Round, roundsOf, submissionsOf } from "./populations.js";

// A round's way: open from when the previous one closed; members submit (`submitMember`); it
// closes when `quorum` members have submitted and either all have or its timeout has passed
// (at a submission, or found by `closeDueRounds`), which hands its merge to a job; the job's
// success registers the outputs and opens the next round (`openNextRound`) in one transaction.

export interface Submission {
  populationId: string;
  round: number;
  member: number;
  checkpointId: string;
  createdAt: Date;
}

/** How long a client is told to wait before it asks again for a round's outputs. */
const NOT_READY_RETRY_SECONDS = 1;
/** How often a waiting request reads its round, unless a job of this process finishes sooner. */
const WAIT_POLL_MS = 250;

function checkMember(population: PopulationRow, member: number): void {
  if (member >= population.size) {
    throw new InvalidInputError(
      `member ${member} is out of range: population ${population.id} has ${population.size} members, 0 to ${population.size - 1}`,
    );
  }
}

/**
 * Member `member`'s weights at the end of `round`: an upload (streamed, validated) or a
 * checkpoint of the tenant's. 201 new (`created`); the same bytes again (even once the round
 * closed) are the same submission. 409 for other bytes in a submitted slot, a round closed or
 * not yet open, or a finished population; 422 for tensors that disagree with the population's
 * (names, shapes, dtypes of its initial checkpoint or first submission). An upload that is not
 * recorded is deleted.
 */
export async function submitMember({
  ctx,
  principal,
  input,
}: TenantCall<{
  id: string;
  round: number;
  member: number;
  upload?: { body: Readable; declaredBytes?: number | undefined } | undefined;
  checkpointId?: string | undefined;
}>): Promise<{ submission: Submission; created: boolean }> {
  const population = await populationRow(ctx.db, principal.tenantId, input.id);
  checkMember(population, input.member);
  const slot = { ...input, population };
  const earlier = await submissionAt(ctx.db, slot);
  if (!earlier) assertOpen(population, input.round);
  let checkpointId: string;
  if (input.upload) {
    const name = `${population.name}-round-${input.round}-member-${input.member}`;
    checkpointId = (await createCheckpoint({ ctx, principal, input: { name, ...input.upload } })).id;
  } else {
    checkpointId = input.checkpointId as string;
    const [row] = await loadInputs(ctx, principal.tenantId, [checkpointId]).catch((err: unknown) => {
      throw err instanceof InvalidInputError
        ? new NotFoundError(`checkpoint ${checkpointId} not found`)
        : err;
    });
    if (row?.deletedAt) throw new InvalidInputError(`checkpoint ${checkpointId} was deleted`);
    if (row) assertPopulationMember(row);
  }
  try {
    const outcome = await record(ctx, slot, checkpointId, earlier);
    if (!outcome.created && input.upload) await discardUpload(ctx, principal.tenantId, checkpointId);
    return outcome;
  } catch (err) {
    if (input.upload) await discardUpload(ctx, principal.tenantId, checkpointId);
    throw err;
  }
}

interface Slot {
  population: PopulationRow;
  round: number;
  member: number;
}

async function submissionAt(db: Database, slot: Slot): Promise<Submission | undefined> {
  const [row] = await db
    .select()
    .from(schema.populationSubmissions)
    .where(
      and(
        eq(schema.populationSubmissions.populationId, slot.population.id),
        eq(schema.populationSubmissions.round, slot.round),
        eq(schema.populationSubmissions.member, slot.member),
      ),
    );
  return row;
}

/** 409 unless `round` is the population's current round and it takes submissions. */
function assertOpen(population: PopulationRow, round: number, merging = false): void {
  if (population.finishJobId) {
    throw new ConflictError(`population ${population.id} is finished: it takes no more submissions`);
  }
  if (round > population.currentRound) {
    throw new ConflictError(
      `round ${round} is not open yet: population ${population.id} is at round ${population.currentRound}`,
    );
  }
  if (round < population.currentRound || merging) {
    throw new ConflictError(
      `round ${round} is closed: population ${population.id} is at round ${population.currentRound}`,
    );
  }
}

/**
 * Records the submission under the tenant's and the population's locks (a concurrent submission
 * or close waits), and closes the round when that makes it due. `earlier`: the slot's submission
 * when the request began, if any (one made since is found under the locks).
 */
async function record(
  ctx: ServiceContext,
  slot: Slot,
  checkpointId: string,
  earlier: Submission | undefined,
): Promise<{ submission: Submission; created: boolean }> {
  const { population } = slot;
  const same = async (existing: Submission) => {
    const [a, b] = await loadInputs(ctx, population.tenantId, [existing.checkpointId, checkpointId]);
    if (a?.sha256 !== b?.sha256) {
      throw new ConflictError(
        `member ${slot.member} already submitted other weights to round ${slot.round} (checkpoint ${existing.checkpointId})`,
      );
    }
    return { submission: existing, created: false };
  };
  if (earlier) return same(earlier);
  await checkTensors(ctx, population, checkpointId);
  const outcome = await ctx.db.transaction(async (tx) => {
    await lockTenant(tx, population.tenantId);
    const locked = await populationRow(tx, population.tenantId, population.id, true);
    const raced = await submissionAt(tx, slot);
    if (raced) return same(raced);
    const [round] = await roundsOf(tx, locked, slot.round);
    assertOpen(locked, slot.round, round?.status !== "open");
    const [submission] = await tx
      .insert(schema.populationSubmissions)
      .values({ populationId: locked.id, round: slot.round, member: slot.member, checkpointId })
      .returning();
    await closeIfDue(ctx, tx, locked, slot.round, round?.openedAt ?? new Date());
    return { submission: submission as Submission, created: true };
  });
  wakeWorkers(ctx);
  return outcome;
}

/**
 * 422 unless the checkpoint's tensors agree with the population's (names, shapes, dtypes): its
 * initial checkpoint's, or else its first submission's still stored. The first of all sets them.
 */
async function checkTensors(
  ctx: ServiceContext,
  population: PopulationRow,
  checkpointId: string,
): Promise<void> {
  let reference = population.initialCheckpointId;
  if (!reference) {
    const [first] = await ctx.db
      .select({ checkpointId: schema.populationSubmissions.checkpointId })
      .from(schema.populationSubmissions)
      .innerJoin(schema.checkpoints, eq(schema.checkpoints.id, schema.populationSubmissions.checkpointId))
      .where(
        and(
          eq(schema.populationSubmissions.populationId, population.id),
          isNull(schema.checkpoints.deletedAt),
        ),
      )
      .orderBy(asc(schema.populationSubmissions.createdAt))
      .limit(1);
    reference = first?.checkpointId ?? null;
  }
  if (!reference || reference === checkpointId) return;
  const inputs = await loadInputs(ctx, population.tenantId, [reference, checkpointId]);
  const params: MergeParams = { method: "papa-all", inputs: [reference, checkpointId] };
  await preflight(() => checkMergeOffThread(...planArguments(ctx, params, inputs, [[0.5, 0.5]], 1 << 16)));
}

/** Deletes an upload that was not recorded as a submission: its row (nothing refers to it) and its bytes. */
async function discardUpload(ctx: ServiceContext, tenantId: string, checkpointId: string): Promise<void> {
  await ctx.db.delete(schema.checkpoints).where(eq(schema.checkpoints.id, checkpointId));
  await ctx.store.delete(checkpointKey(tenantId, checkpointId));
}

/** Whether a round opened at `openedAt` has been open for the population's round timeout. */
function pastTimeout(population: PopulationRow, openedAt: Date): boolean {
  return Date.now() >= openedAt.getTime() + population.roundTimeoutSeconds * 1000;
}

/**
 * Closes round `round` (the population's current, open, under its lock) if it is due: `quorum`
 * submissions, and all members' or its timeout passed. Its merge becomes a job, admitted in
 * this transaction; wake the workers after the commit. Returns whether it closed.
 */
async function closeIfDue(
  ctx: ServiceContext,
  tx: Database,
  population: PopulationRow,
  round: number,
  openedAt: Date,
): Promise<boolean> {
  const submissions = await submissionsOf(tx, population.id, round);
  const due =
    submissions.length === population.size ||
    (submissions.length >= population.quorum && pastTimeout(population, openedAt));
  if (!due) return false;
  const method = population.method as "papa-all" | "papa-2" | "papa";
  const merge: PopulationMerge = {
    id: population.id,
    round,
    soup: false,
    coefficients: roundCoefficients(
      { method, alpha: population.alpha, seed: streamSeed(population.seed, "papa-2", 0, round) },
      population.size,
      submissions.map((s) => s.member),
    ),
  };
  // PAPA's pull of one round is a papa-pull of beta 1 - alpha; its lineage says so.
  const params: MergeParams = {
    ...(method === "papa" ? { method: "papa-pull", beta: 1 - population.alpha } : { method }),
    inputs: submissions.map((s) => s.checkpointId),
    name: population.name,
    population: merge,
  };
  // Dispatched at once: the tenant's running jobs may be the members waiting for it (a placed
  // training's shards), which would otherwise hold every slot of its line.
  const job = await admitJob(ctx, tx, population.tenantId, { kind: "merge", params }, { now: true });
  await tx
    .update(schema.populationRounds)
    .set({ jobId: job.id })
    .where(
      and(
        eq(schema.populationRounds.populationId, population.id),
        eq(schema.populationRounds.round, round),
        isNull(schema.populationRounds.jobId),
      ),
    );
  return true;
}

/**
 * Closes the open rounds (of one population, or all) whose timeout has passed with their quorum
 * reached. Workers call it periodically; a request that reads a round calls it for its
 * population. Returns how many closed.
 */
export async function closeDueRounds(ctx: ServiceContext, populationId?: string): Promise<number> {
  const r = schema.populationRounds;
  const p = schema.populations;
  const due = await ctx.db
    .select({ id: p.id, tenantId: p.tenantId, round: r.round })
    .from(r)
    .innerJoin(p, eq(p.id, r.populationId))
    .where(
      and(
        isNull(r.jobId),
        isNull(p.finishJobId),
        eq(r.round, p.currentRound),
        sql`${r.openedAt} + ${p.roundTimeoutSeconds} * interval '1 second' <= now()`,
        populationId === undefined ? undefined : eq(p.id, populationId),
      ),
    );
  let closed = 0;
  for (const candidate of due) {
    const closes = await ctx.db.transaction(async (tx) => {
      await lockTenant(tx, candidate.tenantId);
      const population = await populationRow(tx, candidate.tenantId, candidate.id, true);
      const [round] = await roundsOf(tx, population, candidate.round);
      if (population.finishJobId || population.currentRound !== candidate.round || round?.status !== "open") {
        return false;
      }
      return closeIfDue(ctx, tx, population, candidate.round, round.openedAt);
    });
    if (closes) closed++;
  }
  if (closed > 0) wakeWorkers(ctx);
  return closed;
}

/** Opens the round after `merge`'s, in the transaction that registers its outputs. */
export async function openNextRound(tx: Database, merge: PopulationMerge): Promise<void> {
  await tx
    .update(schema.populations)
    .set({ currentRound: merge.round + 1 })
    .where(and(eq(schema.populations.id, merge.id), eq(schema.populations.currentRound, merge.round)));
  await tx
    .insert(schema.populationRounds)
    .values({ populationId: merge.id, round: merge.round + 1 })
    .onConflictDoNothing();
}

/**
 * A round of the tenant's population (404 for one not yet open). With `waitSeconds`, answers
 * as soon as the round is closed or failed, or once that time has passed.
 */
export async function getRound({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string; round: number; waitSeconds?: number | undefined }>): Promise<Round> {
  const deadline = Date.now() + (input.waitSeconds ?? 0) * 1000;
  for (;;) {
    const population = await populationRow(ctx.db, principal.tenantId, input.id);
    const [round] = await roundsOf(ctx.db, population, input.round);
    if (!round) {
      throw new NotFoundError(
        `round ${input.round} has not opened: population ${population.id} is at round ${population.currentRound}`,
      );
    }
    // Only a round past its timeout can be due without a submission.
    const due = round.status === "open" && pastTimeout(population, round.openedAt);
    if (due && (await closeDueRounds(ctx, population.id)) > 0) continue;
    const left = deadline - Date.now();
    if (round.status === "closed" || round.status === "failed" || left <= 0) return round;
    await ctx.jobWatch.nextFinish(Math.min(WAIT_POLL_MS, left));
  }
}

/** Member `member`'s next weights from `round`: their checkpoint's id, or 409 (Retry-After) before the round closes. */
export async function memberWeights({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string; round: number; member: number }>): Promise<string> {
  const population = await populationRow(ctx.db, principal.tenantId, input.id);
  checkMember(population, input.member);
  if (input.round > population.currentRound) {
    throw new NotReadyError(
      `round ${input.round} has not opened: population ${population.id} is at round ${population.currentRound}`,
      NOT_READY_RETRY_SECONDS,
    );
  }
  const round = await getRound({ ctx, principal, input });
  const output = round.outputs.find((o) => o.member === input.member);
  if (output) return output.checkpointId;
  if (round.status === "failed") {
    throw new ConflictError(`round ${input.round} failed: its merge job ${round.jobId} did not succeed`);
  }
  throw new NotReadyError(
    `round ${input.round} is ${round.status}: member ${input.member}'s next weights come once it closes`,
    NOT_READY_RETRY_SECONDS,
  );
}
