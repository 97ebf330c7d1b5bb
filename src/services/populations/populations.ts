import { and, asc, desc, eq, inArray, isNotNull, lt, type SQL, sql } from "drizzle-orm";
import type { AnyPgColumn } from "drizzle-orm/pg-core";
import { type Database, schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import { assertPopulationMember } from "../checkpoints/files.js";
import type { TenantCall } from "../context.js";
import { ConflictError, InvalidInputError, NotFoundError } from "../errors.js";
import { admitJob, type Job, type JobStatus } from "../jobs/jobs.js";
import { lockTenant, wakeWorkers } from "../jobs/lifecycle.js";
import type { MergeParams } from "../merges/merges.js";
import { type Page, pageByIdDesc } from "../pagination.js";

export type PopulationRow = typeof schema.populations.$inferSelect;
export type PopulationMethod = "papa-all" | "papa-2" | "papa";
export type RoundStatus = "open" | "merging" | "closed" | "failed";
export type PopulationStatus = "open" | "finishing" | "finished" | "failed";

/** A round as clients see it: its state, who submitted, and (once closed) each member's next weights. */
export interface Round {
  round: number;
  status: RoundStatus;
  openedAt: Date;
  closedAt: Date | null;
  submitted: number[];
  jobId: string | null;
  outputs: { member: number; checkpointId: string }[];
}

export interface Population extends PopulationRow {
  status: PopulationStatus;
  soupCheckpointId: string | null;
  rounds: Round[];
}

/** The most members a population may have. */
export const MAX_POPULATION_SIZE = 64;

/** A merge job's state, as a round's or a population's. */
function stateOf(job: Pick<Job, "status"> | undefined): "pending" | "running" | "succeeded" | "failed" {
  if (!job) return "pending";
  if (job.status === "succeeded") return "succeeded";
  return job.status === "queued" || job.status === "running" ? "running" : "failed";
}

const ROUND_STATUS = { pending: "open", running: "merging", succeeded: "closed", failed: "failed" } as const;
const POPULATION_STATUS = {
  pending: "open",
  running: "finishing",
  succeeded: "finished",
  failed: "failed",
} as const;

export async function createPopulation({
  ctx,
  principal,
  input,
}: TenantCall<{
  name: string;
  size: number;
  method: PopulationMethod;
  alpha?: number | undefined;
  seed?: number | undefined;
  quorum?: number | undefined;
  roundTimeoutSeconds?: number | undefined;
  initialCheckpointId?: string | undefined;
}>): Promise<Population> {
  const quorum = input.quorum ?? input.size;
  if (quorum > input.size) {
    throw new InvalidInputError(`quorum ${quorum} is larger than the population (${input.size} members)`);
  }
  if (input.initialCheckpointId !== undefined) {
    const [initial] = await ctx.db
      .select()
      .from(schema.checkpoints)
      .where(
        and(
          eq(schema.checkpoints.id, input.initialCheckpointId),
          eq(schema.checkpoints.tenantId, principal.tenantId),
        ),
      );
    if (!initial) throw new NotFoundError(`checkpoint ${input.initialCheckpointId} not found`);
    if (initial.deletedAt) throw new InvalidInputError(`checkpoint ${input.initialCheckpointId} was deleted`);
    assertPopulationMember(initial);
  }
  const id = newId();
  await ctx.db.transaction((tx) =>
    insertPopulation(tx, {
      id,
      tenantId: principal.tenantId,
      name: input.name,
      size: input.size,
      method: input.method,
      alpha: input.alpha ?? 0.99,
      seed: input.seed ?? 0,
      quorum,
      roundTimeoutSeconds: input.roundTimeoutSeconds ?? 3600,
      initialCheckpointId: input.initialCheckpointId ?? null,
    }),
  );
  return getPopulation({ ctx, principal, input: { id } });
}

/** Records a population and opens its round 0, in the caller's transaction. */
export async function insertPopulation(
  tx: Database,
  population: typeof schema.populations.$inferInsert,
): Promise<void> {
  await tx.insert(schema.populations).values(population);
  await tx.insert(schema.populationRounds).values({ populationId: population.id, round: 0 });
}

/** The population's row, for the tenant (404 otherwise); `lock` takes it for update. */
export async function populationRow(
  db: Database,
  tenantId: string,
  id: string,
  lock = false,
): Promise<PopulationRow> {
  const query = db
    .select()
    .from(schema.populations)
    .where(and(eq(schema.populations.id, id), eq(schema.populations.tenantId, tenantId)));
  const [row] = lock ? await query.for("update") : await query;
  if (!row) throw new NotFoundError(`population ${id} not found`);
  return row;
}

/** Rounds chosen by a condition on a population id and a round number, oldest first, by population id. */
async function loadRounds(
  db: Database,
  which: (populationId: AnyPgColumn, round: AnyPgColumn) => SQL | undefined,
): Promise<Map<string, Round[]>> {
  const r = schema.populationRounds;
  const s = schema.populationSubmissions;
  const c = schema.checkpoints;
  const rows = await db
    .select({
      populationId: r.populationId,
      round: r.round,
      openedAt: r.openedAt,
      jobId: r.jobId,
      jobStatus: schema.jobs.status,
      finishedAt: schema.jobs.finishedAt,
    })
    .from(r)
    .leftJoin(schema.jobs, eq(schema.jobs.id, r.jobId))
    .where(which(r.populationId, r.round))
    .orderBy(asc(r.round));
  const submissions = await db
    .select({ populationId: s.populationId, round: s.round, member: s.member })
    .from(s)
    .where(which(s.populationId, s.round))
    .orderBy(asc(s.member));
  const outputs = await db
    .select({ id: c.id, populationId: c.populationId, round: c.populationRound, member: c.populationMember })
    .from(c)
    .where(and(which(c.populationId, c.populationRound), isNotNull(c.populationMember)))
    .orderBy(asc(c.populationMember));
  const of = (row: (typeof rows)[number]) => (o: { populationId: string | null; round: number | null }) =>
    o.populationId === row.populationId && o.round === row.round;
  const byPopulation = new Map<string, Round[]>();
  for (const row of rows) {
    const state = stateOf(row.jobStatus ? { status: row.jobStatus as JobStatus } : undefined);
    const rounds = byPopulation.get(row.populationId) ?? [];
    byPopulation.set(row.populationId, rounds);
    rounds.push({
      round: row.round,
      status: ROUND_STATUS[state],
      openedAt: row.openedAt,
      closedAt: state === "succeeded" ? row.finishedAt : null,
      submitted: submissions.filter(of(row)).map((s) => s.member),
      jobId: row.jobId,
      outputs: outputs.filter(of(row)).map((o) => ({ member: o.member as number, checkpointId: o.id })),
    });
  }
  return byPopulation;
}

/** The rounds of a population (`only`: just that one), oldest first, with their jobs' states. */
export async function roundsOf(db: Database, population: PopulationRow, only?: number): Promise<Round[]> {
  const rounds = await loadRounds(db, (populationId, round) =>
    and(eq(populationId, population.id), only === undefined ? undefined : eq(round, only)),
  );
  return rounds.get(population.id) ?? [];
}

/** The finish jobs of these populations, by id. */
async function finishJobsOf(db: Database, rows: PopulationRow[]): Promise<Map<string, Job>> {
  const ids = rows.flatMap((row) => (row.finishJobId ? [row.finishJobId] : []));
  const jobs =
    ids.length === 0 ? [] : await db.select().from(schema.jobs).where(inArray(schema.jobs.id, ids));
  return new Map(jobs.map((job) => [job.id, job]));
}

function withState(row: PopulationRow, rounds: Round[], finish: Job | undefined): Population {
  const finishState = stateOf(finish);
  const soup = finishState === "succeeded" ? (finish?.result as { soup_checkpoint_id?: string }) : null;
  const roundFailed = rounds.at(-1)?.status === "failed";
  return {
    ...row,
    status: roundFailed ? "failed" : POPULATION_STATUS[finishState],
    soupCheckpointId: soup?.soup_checkpoint_id ?? null,
    rounds,
  };
}

/** A population of the tenant's (404 otherwise), with every round or (`currentOnly`) its current one. */
export async function getPopulation({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string; currentOnly?: boolean }>): Promise<Population> {
  const row = await populationRow(ctx.db, principal.tenantId, input.id);
  const rounds = await roundsOf(ctx.db, row, input.currentOnly ? row.currentRound : undefined);
  return withState(row, rounds, (await finishJobsOf(ctx.db, [row])).get(row.finishJobId ?? ""));
}

/** The tenant's populations, newest first, each with its state but not its rounds. */
export async function listPopulations({
  ctx,
  principal,
  input,
}: TenantCall<{ limit: number; cursor?: string | undefined }>): Promise<Page<Population>> {
  const page = await pageByIdDesc(input, (before, take) =>
    ctx.db
      .select()
      .from(schema.populations)
      .where(
        and(
          eq(schema.populations.tenantId, principal.tenantId),
          before === undefined ? undefined : lt(schema.populations.id, before),
        ),
      )
      .orderBy(desc(schema.populations.id))
      .limit(take),
  );
  // Each population's current round, and the finish jobs, in one query each for the page.
  const p = schema.populations;
  const ids = page.items.map((row) => row.id);
  const rounds =
    ids.length === 0
      ? new Map<string, Round[]>()
      : await loadRounds(
          ctx.db,
          (populationId, round) =>
            sql`(${populationId}, ${round}) in (select ${p.id}, ${p.currentRound} from ${p} where ${inArray(p.id, ids)})`,
        );
  const finishJobs = await finishJobsOf(ctx.db, page.items);
  const items = page.items.map((row) =>
    withState(row, rounds.get(row.id) ?? [], finishJobs.get(row.finishJobId ?? "")),
  );
  return { items, nextCursor: page.nextCursor };
}

/** The submissions of a round, in member order, as merge inputs. */
export async function submissionsOf(
  db: Database,
  populationId: string,
  round: number,
): Promise<{ member: number; checkpointId: string }[]> {
  return db
    .select({
      member: schema.populationSubmissions.member,
      checkpointId: schema.populationSubmissions.checkpointId,
    })
    .from(schema.populationSubmissions)
    .where(
      and(
        eq(schema.populationSubmissions.populationId, populationId),
        eq(schema.populationSubmissions.round, round),
      ),
    )
    .orderBy(asc(schema.populationSubmissions.member));
}

/**
 * Ends the population: a merge job makes the uniform soup of the submissions of its current
 * round, when at least `quorum` members submitted to it, or else of its last closed round. No
 * submission is taken after. Asking again returns the same job (`created` false), unless that
 * job failed, when a new one is made. 409 while a round is merging, or when no round has
 * reached its quorum.
 */
export async function finishPopulation({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string }>): Promise<{ job: Job; created: boolean }> {
  const outcome = await ctx.db.transaction(async (tx) => {
    await lockTenant(tx, principal.tenantId);
    const population = await populationRow(tx, principal.tenantId, input.id, true);
    if (population.finishJobId) {
      const [earlier] = await tx.select().from(schema.jobs).where(eq(schema.jobs.id, population.finishJobId));
      if (earlier && stateOf(earlier) !== "failed") return { job: earlier, created: false };
    }
    const [current] = await roundsOf(tx, population, population.currentRound);
    if (current?.status === "merging") {
      throw new ConflictError(`round ${current.round} is merging; finish the population once it closes`);
    }
    let round = population.currentRound;
    let submissions = await submissionsOf(tx, population.id, round);
    if (submissions.length < population.quorum || current?.status === "failed") {
      round -= 1;
      submissions = round < 0 ? [] : await submissionsOf(tx, population.id, round);
    }
    if (submissions.length === 0) {
      throw new ConflictError(
        `no round of population ${population.id} has reached its quorum of ${population.quorum}: nothing to average`,
      );
    }
    const n = submissions.length;
    const params: MergeParams = {
      method: "papa-all",
      inputs: submissions.map((s) => s.checkpointId),
      name: population.name,
      population: { id: population.id, round, soup: true, coefficients: [submissions.map(() => 1 / n)] },
    };
    const job = await admitJob(ctx, tx, principal.tenantId, { kind: "merge", params });
    await tx
      .update(schema.populations)
      .set({ finishJobId: job.id })
      .where(eq(schema.populations.id, population.id));
    return { job, created: true };
  });
  wakeWorkers(ctx);
  return outcome;
}
