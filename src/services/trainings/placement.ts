import { Readable } from "node:stream";
import { and, eq, inArray } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";
import { deleteCheckpoint } from "../checkpoints/checkpoints.js";
import type { ServiceContext } from "../context.js";
import { ConflictError } from "../errors.js";
import { admitJob, cancelJob, FINISHED, type Job } from "../jobs/jobs.js";
import { jobScratchPrefix, lockTenant, wakeWorkers } from "../jobs/lifecycle.js";
import {
  insertPopulation,
  type PopulationMethod,
  populationRow,
  roundsOf,
  submissionsOf,
} from "../populations/populations.js";
import { getRound, submitMember } from "../populations/rounds.js";
import { makesUniformSoup, type Placement, shardMembers } from "./shards.js";
import type { TrainingParams } from "./trainings.js";

// A training placed on N workers (`placement: {workers: N}`): its job is shard 0, the lead; it
// makes a population and N - 1 more train jobs, one per shard, which any worker may run. Each
// shard trains its members and meets the others at the population's rounds (`syncRounds`): it
// submits its members' weights, waits for the round to close, and takes back the outputs. After
// the last sync round, one more round gathers every member's final weights for the lead (and the
// last shard). Each shard evaluates its own members, the last one the uniform soup too, while the
// lead makes the greedy soup; the lead adds the others' evaluations to its own and stores the
// outputs as a one-process training does.

/**
 * How often a waiting shard reads its round (unless a job of its process finishes sooner: the
 * round's merge, often), and looks at the other shards' jobs. A shard waits at every sync point,
 * so this is part of each round's cost: shorter than an API client's poll.
 */
const POLL_MS = 50;
const SIBLINGS_EVERY_MS = 1000;

/** The population's averaging rule for a variant: papa pulls toward the mean by its own schedule. */
function populationMethod(params: TrainingParams): PopulationMethod {
  return params.population.variant === "papa-2" ? "papa-2" : "papa-all";
}

/**
 * The lead's first step: its population and the other shards' jobs, made once (derived ids;
 * a retried lead finds them). A round closes without the members of one shard at most (quorum),
 * once its timeout has passed: a shard whose worker died does not stop the others.
 */
export async function placeShards(ctx: ServiceContext, job: Job, placement: Placement): Promise<void> {
  const params = job.params as TrainingParams;
  const size = params.population.size;
  const largest = Math.max(
    ...placement.jobIds.map((_, s) => shardMembers(size, placement.workers, s).length),
  );
  await ctx.db.transaction(async (tx) => {
    await lockTenant(tx, job.tenantId);
    const [existing] = await tx
      .select({ id: schema.populations.id })
      .from(schema.populations)
      .where(eq(schema.populations.id, placement.populationId));
    if (existing) return;
    await insertPopulation(tx, {
      id: placement.populationId,
      tenantId: job.tenantId,
      name: params.name ?? `${params.population.variant}-${params.dataset}`,
      size,
      method: populationMethod(params),
      alpha: 0,
      seed: params.population.seed ?? 0,
      quorum: size - largest,
      roundTimeoutSeconds: params.placement?.round_timeout_seconds ?? DEFAULT_ROUND_TIMEOUT_SECONDS,
      initialCheckpointId: null,
    });
    for (const [s, id] of placement.jobIds.entries()) {
      if (s === 0) continue;
      const shard = { lead_job_id: job.id, index: s };
      await admitJob(ctx, tx, job.tenantId, { id, kind: "train", params: { ...params, shard } });
    }
  });
  wakeWorkers(ctx);
}

/** A placed training's round timeout unless the request sets one. */
export const DEFAULT_ROUND_TIMEOUT_SECONDS = 600;

/** Members' weights handed between a shard's training process and its worker. */
export interface MemberBytes {
  member: number;
  bytes: Uint8Array;
}

/**
 * What `gather` answers: whether the final weights were taken, and (to the lead and the shard that
 * makes the uniform soup) every member's.
 */
export interface Gathered {
  taken: boolean;
  weights: StoredWeights[];
}

/** Where a resumed shard starts: the latest closed round, and its members' weights from it. */
export interface ResumePoint {
  round: number;
  weights: StoredWeights[];
}

/** Where a member's weights from the population are in the store. */
export interface StoredWeights {
  member: number;
  key: string;
  sizeBytes: number;
}

/** What a shard's training process asks its worker (`shardRequests`). */
export type ShardRequest =
  | { kind: "resume"; members: number[] }
  | { kind: "exchange"; round: number; weights: MemberBytes[] }
  | { kind: "gather"; round: number; weights: MemberBytes[] }
  | { kind: "evaluations" };

/**
 * A shard's evaluation of its members (and, by the shard that `makesUniformSoup`, of the uniform
 * soup), as its job's result holds it (the API's field names).
 */
export interface ShardEvaluation {
  members: { member: number; accuracy: number }[];
  uniform_soup?: { accuracy: number };
}

/**
 * Where shard `shard` leaves what the lead takes from it, in the lead's scratch: its members'
 * test probabilities, and the uniform soup's weights.
 */
export function shardOutputKey(
  tenantId: string,
  placement: Placement,
  shard: number,
  what: "test-probabilities.f32" | "uniform-soup.safetensors",
): string {
  return `${jobScratchPrefix({ tenantId, id: placement.leadJobId })}shard-${shard}-${what}`;
}

/** A failure of a placed training that no retry of this shard can mend. */
class PlacementError extends Error {
  readonly permanent = true;
}

/**
 * The worker's side of a shard's training process: `resume` finds the latest closed round (and
 * these members' weights from it); `exchange` submits the members' weights to a round, waits for
 * it to close and returns their new weights; `gather` submits the final weights (and says
 * whether they were taken) and, for the lead and the uniform soup's shard, waits and returns
 * every member's (its submission, or the round's output for a member whose shard did not
 * submit). While waiting, a shard whose sibling failed or was canceled fails for good. A slot
 * that an earlier attempt filled keeps that submission, and a round that closed without a member
 * gives it its output.
 */
export function shardRequests(
  ctx: ServiceContext,
  job: Job,
  placement: Placement,
  signal: AbortSignal,
): (body: unknown) => Promise<unknown> {
  const principal = { tenantId: job.tenantId };
  const id = placement.populationId;

  /** Submits the members' weights, at once; returns whether every one was taken. */
  const submit = async (round: number, weights: MemberBytes[]): Promise<boolean> => {
    const taken = await Promise.all(weights.map(({ member, bytes }) => submitOne(round, member, bytes)));
    return taken.every(Boolean);
  };

  const submitOne = async (round: number, member: number, bytes: Uint8Array): Promise<boolean> => {
    const upload = { body: Readable.from([Buffer.from(bytes)]), declaredBytes: bytes.byteLength };
    try {
      await submitMember({ ctx, principal, input: { id, round, member, upload } });
      return true;
    } catch (err) {
      // The slot keeps what an earlier attempt submitted, or the round closed without it (its
      // timeout passed): either way the member takes the round's output.
      if (!(err instanceof ConflictError)) throw err;
      ctx.logger.warn("a member's submission was not taken", {
        job_id: job.id,
        round,
        member,
        reason: err.message,
      });
      return false;
    }
  };

  const closed = async (round: number) => {
    for (let checked = Date.now(); ; ) {
      signal.throwIfAborted();
      const state = await getRound({ ctx, principal, input: { id, round } });
      if (state.status === "closed") return state;
      if (state.status === "failed") {
        throw new PlacementError(
          `round ${round} of population ${id} failed: its merge job ${state.jobId} did not succeed`,
        );
      }
      if (Date.now() - checked > SIBLINGS_EVERY_MS) {
        await assertSiblingsLive(ctx.db, job, placement);
        checked = Date.now();
      }
      await ctx.jobWatch.nextFinish(POLL_MS);
    }
  };

  // Only the latest closed round is kept (a retried shard resumes from it): the lead deletes the
  // round before, whose merge and readers are done (their records and lineage stay). It does so
  // while its members train for the next round (`forgetting`, awaited at its next request).
  let forgetting: Promise<void> = Promise.resolve();
  const forget = async (round: number) => {
    if (placement.shard !== 0 || round < 0) return;
    const [state] = await roundsOf(ctx.db, await populationRow(ctx.db, job.tenantId, id), round);
    const submitted = await submissionsOf(ctx.db, id, round);
    const ids = [
      ...submitted.map((s) => s.checkpointId),
      ...(state?.outputs ?? []).map((o) => o.checkpointId),
    ];
    for (const checkpointId of ids) await deleteCheckpoint({ ctx, principal, input: { id: checkpointId } });
  };

  return async (body) => {
    const request = body as ShardRequest;
    await forgetting;
    if (request.kind === "resume") {
      const point = await resumePoint(ctx.db, job.tenantId, id, request.members);
      if (point) ctx.logger.info("shard resumes from its population", { job_id: job.id, round: point.round });
      return point;
    }
    if (request.kind === "evaluations") return shardEvaluations(ctx, job, placement, signal);
    const taken = await submit(request.round, request.weights);
    // A shard other than the lead is done, unless it makes the uniform soup; its evaluation counts
    // if its final weights are the ones the lead gathers.
    const lead = placement.shard === 0;
    if (request.kind === "gather" && !lead && !(taken && makesUniformSoup(placement))) {
      return { taken, weights: [] };
    }
    const round = await closed(request.round);
    forgetting = forget(request.round - 1);
    forgetting.catch(() => {}); // Thrown by the next request's await.
    const outputs = new Map(round.outputs.map((o) => [o.member, o.checkpointId]));
    if (request.kind === "exchange") {
      return storedWeights(
        ctx.db,
        request.weights.map((w) => ({ member: w.member, checkpointId: outputs.get(w.member) ?? "" })),
      );
    }
    if (lead) await cancelShardsBehind(ctx, job, placement, round.submitted);
    const submitted = new Map(
      (await submissionsOf(ctx.db, id, request.round)).map((s) => [s.member, s.checkpointId]),
    );
    const weights = await storedWeights(
      ctx.db,
      [...outputs.keys()].map((member) => ({
        member,
        checkpointId: submitted.get(member) ?? outputs.get(member) ?? "",
      })),
    );
    return { taken, weights };
  };
}

/**
 * The lead's wait for the other shards' evaluations of their members (each in its job's result,
 * its test probabilities in the store): each shard's once its job has succeeded. A shard that
 * failed, or has not finished within the round timeout, is left out: the lead evaluates its
 * members itself.
 */
async function shardEvaluations(
  ctx: ServiceContext,
  job: Job,
  placement: Placement,
  signal: AbortSignal,
): Promise<(ShardEvaluation & { shard: number })[]> {
  const params = job.params as TrainingParams;
  const deadline =
    Date.now() + (params.placement?.round_timeout_seconds ?? DEFAULT_ROUND_TIMEOUT_SECONDS) * 1000;
  const evaluations = [];
  for (const [s, id] of placement.jobIds.entries()) {
    if (s === 0) continue;
    for (;;) {
      signal.throwIfAborted();
      const [shard] = await ctx.db
        .select({ status: schema.jobs.status, result: schema.jobs.result })
        .from(schema.jobs)
        .where(eq(schema.jobs.id, id));
      const evaluation = (shard?.result as { placement?: { evaluation?: ShardEvaluation } } | null)?.placement
        ?.evaluation;
      if (shard?.status === "succeeded" && evaluation) {
        evaluations.push({ ...evaluation, shard: s });
      }
      if (!shard || FINISHED.includes(shard.status) || Date.now() > deadline) break;
      await ctx.jobWatch.nextFinish(250);
    }
  }
  return evaluations;
}

/**
 * Cancels the shards whose members did not reach the final round (it closed at its timeout
 * without them): the lead has what it needs, and their work would be lost.
 */
async function cancelShardsBehind(
  ctx: ServiceContext,
  job: Job,
  placement: Placement,
  submitted: number[],
): Promise<void> {
  const size = (job.params as TrainingParams).population.size;
  for (const [s, shardJobId] of placement.jobIds.entries()) {
    const members = shardMembers(size, placement.workers, s);
    if (s === 0 || members.every((m) => submitted.includes(m))) continue;
    ctx.logger.warn("canceling a shard that did not reach the final round", { job_id: shardJobId, shard: s });
    await cancelJob({ ctx, principal: job, input: { id: shardJobId } }).catch((err: unknown) => {
      if (!(err instanceof ConflictError)) throw err;
    });
  }
}

/** The latest closed round of the population and these members' outputs from it, or null before any closed. */
async function resumePoint(
  db: Database,
  tenantId: string,
  populationId: string,
  members: number[],
): Promise<ResumePoint | null> {
  const population = await populationRow(db, tenantId, populationId);
  const round = population.currentRound - 1;
  if (round < 0) return null;
  const outputs = await db
    .select({ member: schema.checkpoints.populationMember, checkpointId: schema.checkpoints.id })
    .from(schema.checkpoints)
    .where(
      and(eq(schema.checkpoints.populationId, populationId), eq(schema.checkpoints.populationRound, round)),
    );
  const weights = members.map((member) => ({
    member,
    checkpointId: outputs.find((o) => o.member === member)?.checkpointId ?? "",
  }));
  return { round, weights: await storedWeights(db, weights) };
}

/** Where these checkpoints' bytes are. */
async function storedWeights(
  db: Database,
  members: { member: number; checkpointId: string }[],
): Promise<StoredWeights[]> {
  const rows = await db
    .select({
      id: schema.checkpoints.id,
      key: schema.checkpoints.storageKey,
      sizeBytes: schema.checkpoints.sizeBytes,
    })
    .from(schema.checkpoints)
    .where(
      inArray(
        schema.checkpoints.id,
        members.map((m) => m.checkpointId),
      ),
    );
  return members.map(({ member, checkpointId }) => {
    const row = rows.find((r) => r.id === checkpointId);
    if (!row) throw new Error(`member ${member}'s weights (checkpoint ${checkpointId}) are missing`);
    return { member, key: row.key, sizeBytes: row.sizeBytes };
  });
}

/** Fails for good when another shard's job has ended without success, or the lead's has ended at all. */
async function assertSiblingsLive(db: Database, job: Job, placement: Placement): Promise<void> {
  const others = placement.jobIds.filter((id) => id !== job.id);
  const rows = await db
    .select({ id: schema.jobs.id, status: schema.jobs.status })
    .from(schema.jobs)
    .where(inArray(schema.jobs.id, others));
  for (const row of rows) {
    const lead = row.id === placement.leadJobId;
    if (FINISHED.includes(row.status) && (lead || row.status !== "succeeded")) {
      const shard = placement.jobIds.indexOf(row.id);
      throw new PlacementError(
        `shard ${shard} of this training (job ${row.id}) ${row.status}: the population cannot reach its next round`,
      );
    }
  }
}
