import type { Readable } from "node:stream";
import { and, desc, eq, getTableColumns, inArray, isNull, lt, sql } from "drizzle-orm";
import { preparedQuery, schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import type { TfjsTopology } from "../../ml/export.js";
import type { ByteRange } from "../../storage/object-store.js";
import { SafetensorsError, SafetensorsValidator } from "../../tensors/safetensors.js";
import { readBytes, storeSource } from "../../tensors/source.js";
import type { ServiceContext, SystemCall, TenantCall } from "../context.js";
import { GoneError, InvalidInputError, NotFoundError, PayloadTooLargeError } from "../errors.js";
import { type Page, pageByIdDesc } from "../pagination.js";
import { pipeUpload } from "../upload-stream.js";

export interface CheckpointParent {
  checkpointId: string;
  coefficient: number;
  method: string;
  jobId: string | null;
}

export interface Metric {
  id: string;
  dataset: string;
  split: string;
  name: string;
  value: number;
  jobId: string | null;
  createdAt: Date;
}

export interface Checkpoint {
  id: string;
  name: string;
  format: string;
  sizeBytes: number;
  sha256: string;
  tensorCount: number;
  parameterCount: number;
  dtypes: string[];
  metadata: Record<string, string> | null;
  hasTopology: boolean;
  /** TF.js topology and weight manifest, for models this service trained. */
  topology: TfjsTopology | null;
  jobId: string | null;
  /** A population's output: its round, and the member it is for (null: the final soup). */
  population: { id: string; round: number; member: number | null } | null;
  parents: CheckpointParent[];
  metrics: Metric[];
  createdAt: Date;
  deletedAt: Date | null;
  /** Where the bytes are in the object store; never shown to clients. */
  storageKey: string;
}

/** Object-store key of a checkpoint's bytes; derived from ids so a retried write lands in one place. */
export function checkpointKey(tenantId: string, checkpointId: string): string {
  return `tenants/${tenantId}/checkpoints/${checkpointId}.safetensors`;
}

type Row = typeof schema.checkpoints.$inferSelect;

function toCheckpoint(row: Row, parents: CheckpointParent[], metrics: Metric[]): Checkpoint {
  return {
    id: row.id,
    name: row.name,
    format: row.format,
    sizeBytes: row.sizeBytes,
    sha256: row.sha256,
    tensorCount: row.tensorCount,
    parameterCount: row.parameterCount,
    dtypes: row.dtypes,
    metadata: row.metadata ?? null,
    hasTopology: row.topology !== null,
    topology: row.topology as Checkpoint["topology"],
    jobId: row.jobId,
    population:
      row.populationId === null
        ? null
        : { id: row.populationId, round: row.populationRound ?? 0, member: row.populationMember },
    parents,
    metrics,
    createdAt: row.createdAt,
    deletedAt: row.deletedAt,
    storageKey: row.storageKey,
  };
}

/** Metrics of these checkpoints, oldest first. */
export async function metricsOf(ctx: ServiceContext, ids: string[]): Promise<Map<string, Metric[]>> {
  const byCheckpoint = new Map<string, Metric[]>();
  if (ids.length === 0) return byCheckpoint;
  const rows = await ctx.db
    .select()
    .from(schema.metrics)
    .where(inArray(schema.metrics.checkpointId, ids))
    .orderBy(schema.metrics.id);
  for (const { checkpointId, ...metric } of rows) {
    byCheckpoint.set(checkpointId, [...(byCheckpoint.get(checkpointId) ?? []), metric]);
  }
  return byCheckpoint;
}

const e = schema.lineageEdges;
const m = schema.metrics;
/** The outer row's id, qualified: in a selection drizzle writes columns without their table. */
const outerCheckpointId = sql`${schema.checkpoints}.${sql.identifier("id")}`;

type MetricJson = Omit<Metric, "createdAt"> & { createdAt: string };

/**
 * A checkpoint's columns with its parents (by parent id) and metrics (oldest first) as JSON
 * arrays: one query for a page of checkpoints, not three.
 */
const withRelations = {
  ...getTableColumns(schema.checkpoints),
  parents: sql<CheckpointParent[]>`coalesce((select json_agg(json_build_object(
    'checkpointId', ${e.parentId}, 'coefficient', ${e.coefficient}, 'method', ${e.method}, 'jobId', ${e.jobId}
  ) order by ${e.parentId}) from ${e} where ${e.childId} = ${outerCheckpointId}), '[]')`,
  metrics: sql<MetricJson[]>`coalesce((select json_agg(json_build_object(
    'id', ${m.id}, 'dataset', ${m.dataset}, 'split', ${m.split}, 'name', ${m.name}, 'value', ${m.value},
    'jobId', ${m.jobId}, 'createdAt', ${m.createdAt}
  ) order by ${m.id}) from ${m} where ${m.checkpointId} = ${outerCheckpointId}), '[]')`,
};

function withRelationsToCheckpoint({
  parents,
  metrics,
  ...row
}: Row & { parents: CheckpointParent[]; metrics: MetricJson[] }): Checkpoint {
  return toCheckpoint(
    row,
    parents,
    metrics.map((metric) => ({ ...metric, createdAt: new Date(metric.createdAt) })),
  );
}

/**
 * Streams an upload into the object store while validating it as safetensors and hashing it,
 * then registers it. Memory stays constant (the header plus a chunk). On any failure - invalid
 * bytes, size limit, client gone, database error - nothing remains: no blob, no row.
 */
export async function createCheckpoint({
  ctx,
  principal,
  input,
}: TenantCall<{ name: string; body: Readable; declaredBytes?: number | undefined }>): Promise<Checkpoint> {
  const { maxUploadBytes, maxSafetensorsHeaderBytes } = ctx.limits;
  if (input.declaredBytes !== undefined && input.declaredBytes > maxUploadBytes) {
    // The body is left unread: the caller answers first, then drops the connection.
    throw new PayloadTooLargeError(
      `the upload is ${input.declaredBytes} bytes; the limit is ${maxUploadBytes} bytes`,
      { limit_bytes: maxUploadBytes },
    );
  }
  const id = newId();
  const key = checkpointKey(principal.tenantId, id);
  const validator = new SafetensorsValidator({
    maxHeaderBytes: maxSafetensorsHeaderBytes,
    maxBytes: maxUploadBytes,
  });
  const [piped, stored] = await Promise.allSettled([
    pipeUpload(input.body, validator),
    ctx.store.put(key, validator),
  ]);
  if (piped.status === "rejected" || stored.status === "rejected") {
    const reason = piped.status === "rejected" ? piped.reason : (stored as PromiseRejectedResult).reason;
    throw asUploadError(reason, ctx.limits.maxUploadBytes, maxSafetensorsHeaderBytes);
  }
  const summary = validator.summary();
  try {
    if (stored.value.sizeBytes !== summary.sizeBytes) {
      throw new Error(`store holds ${stored.value.sizeBytes} bytes, ${summary.sizeBytes} were uploaded`);
    }
    const [row] = await ctx.db
      .insert(schema.checkpoints)
      .values({
        id,
        tenantId: principal.tenantId,
        name: input.name,
        sizeBytes: summary.sizeBytes,
        sha256: summary.sha256,
        tensorCount: summary.tensorCount,
        parameterCount: summary.parameterCount,
        dtypes: summary.dtypes,
        metadata: summary.metadata,
        storageKey: key,
      })
      .returning();
    if (!row) throw new Error("checkpoint insert returned no row");
    return toCheckpoint(row, [], []);
  } catch (err) {
    await ctx.store.delete(key);
    throw err;
  }
}

function asUploadError(reason: unknown, maxUploadBytes: number, maxHeaderBytes: number): unknown {
  if (!(reason instanceof SafetensorsError)) return reason;
  switch (reason.problem) {
    case "too_large":
      return new PayloadTooLargeError(reason.message, { limit_bytes: maxUploadBytes });
    case "header_too_large":
      return new PayloadTooLargeError(reason.message, { limit_bytes: maxHeaderBytes });
    default:
      return new InvalidInputError(`not a valid safetensors file: ${reason.message}`, {
        safetensors_error: reason.problem,
      });
  }
}

/** A page of a tenant's live checkpoints, newest first; one prepared query with and one without each filter. */
function checkpointPage(afterCursor: boolean, named: boolean) {
  const c = schema.checkpoints;
  return preparedQuery((db) =>
    db
      .select(withRelations)
      .from(c)
      .where(
        and(
          eq(c.tenantId, sql.placeholder("tenantId")),
          isNull(c.deletedAt),
          named ? eq(c.name, sql.placeholder("name")) : undefined,
          afterCursor ? lt(c.id, sql.placeholder("before")) : undefined,
        ),
      )
      .orderBy(desc(c.id))
      .limit(sql.placeholder("take"))
      .prepare(`checkpoint_page_${afterCursor}_${named}`),
  );
}

const checkpointPages = {
  "false false": checkpointPage(false, false),
  "false true": checkpointPage(false, true),
  "true false": checkpointPage(true, false),
  "true true": checkpointPage(true, true),
};

const checkpointOfTenant = preparedQuery((db) =>
  db
    .select(withRelations)
    .from(schema.checkpoints)
    .where(
      and(
        eq(schema.checkpoints.id, sql.placeholder("id")),
        eq(schema.checkpoints.tenantId, sql.placeholder("tenantId")),
      ),
    )
    .prepare("checkpoint_of_tenant"),
);

/** Newest first; deleted checkpoints are left out. `cursor` is the previous page's `nextCursor`. */
export async function listCheckpoints({
  ctx,
  principal,
  input,
}: TenantCall<{ limit: number; cursor?: string | undefined; name?: string | undefined }>): Promise<
  Page<Checkpoint>
> {
  const query = checkpointPages[`${input.cursor !== undefined} ${input.name !== undefined}`];
  const page = await pageByIdDesc(input, (before, take) =>
    query(ctx.db).execute({ tenantId: principal.tenantId, name: input.name, before, take }),
  );
  return { items: page.items.map(withRelationsToCheckpoint), nextCursor: page.nextCursor };
}

/** A checkpoint of the caller's tenant, deleted ones included (their lineage stays meaningful). */
export async function getCheckpoint({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string }>): Promise<Checkpoint> {
  const [row] = await checkpointOfTenant(ctx.db).execute({ id: input.id, tenantId: principal.tenantId });
  if (!row) throw new NotFoundError(`checkpoint ${input.id} not found`);
  return withRelationsToCheckpoint(row);
}

/**
 * Marks a checkpoint deleted and removes its bytes, unless another live checkpoint shares them
 * (the twin outputs of one merge: a papa-all round's members); its lineage edges and metrics
 * stay. Deleting a deleted checkpoint is a no-op.
 */
export async function deleteCheckpoint({ ctx, principal, input }: TenantCall<{ id: string }>): Promise<void> {
  const c = schema.checkpoints;
  const orphaned = await ctx.db.transaction(async (tx) => {
    // Every checkpoint on the same bytes, locked in id order, so that twins deleted at once take
    // turns (without deadlock) and the last one finds none live.
    const sharing = await tx
      .select({ id: c.id, deletedAt: c.deletedAt, storageKey: c.storageKey })
      .from(c)
      .where(
        sql`${c.storageKey} = (select ${c.storageKey} from ${c} where ${c.id} = ${input.id} and ${c.tenantId} = ${principal.tenantId})`,
      )
      .orderBy(c.id)
      .for("update");
    const target = sharing.find((row) => row.id === input.id);
    if (!target || target.deletedAt) return null;
    await tx.update(c).set({ deletedAt: new Date() }).where(eq(c.id, input.id));
    return sharing.every((row) => row.id === input.id || row.deletedAt) ? target.storageKey : undefined;
  });
  if (orphaned) await ctx.store.delete(orphaned);
  if (orphaned === null) await getCheckpoint({ ctx, principal, input }); // 404 unless it was already deleted
}

/** Throws `GoneError` for a deleted checkpoint: its record remains, its bytes do not. */
export function assertCheckpointAvailable(checkpoint: Checkpoint): void {
  if (checkpoint.deletedAt) {
    throw new GoneError(`checkpoint ${checkpoint.id} was deleted at ${checkpoint.deletedAt.toISOString()}`);
  }
}

/** Streams a checkpoint's bytes, or `range` of them (which the caller resolved against its size). */
export async function openCheckpointWeights({
  ctx,
  input,
}: SystemCall<{ checkpoint: Checkpoint; range?: ByteRange | undefined }>): Promise<Readable> {
  const { checkpoint, range } = input;
  assertCheckpointAvailable(checkpoint);
  return ctx.store.get(checkpoint.storageKey, range);
}

/** A presigned, time-limited URL to the bytes, or null when the store cannot make one. */
export async function presignCheckpointWeights({
  ctx,
  input,
}: SystemCall<{ checkpoint: Checkpoint }>): Promise<string | null> {
  assertCheckpointAvailable(input.checkpoint);
  return ctx.store.presignGet(input.checkpoint.storageKey, {
    expiresInSeconds: ctx.presignExpiresSeconds,
    fileName: `${input.checkpoint.name}.safetensors`,
  });
}

/** Records a metric measured elsewhere for a checkpoint of the caller's tenant. */
export async function recordMetric({
  ctx,
  principal,
  input,
}: TenantCall<{
  checkpointId: string;
  dataset: string;
  split: string;
  name: string;
  value: number;
}>): Promise<Metric> {
  await getCheckpoint({ ctx, principal, input: { id: input.checkpointId } });
  const [row] = await ctx.db
    .insert(schema.metrics)
    .values({
      id: newId(),
      checkpointId: input.checkpointId,
      dataset: input.dataset,
      split: input.split,
      name: input.name,
      value: input.value,
    })
    .returning();
  if (!row) throw new Error("metric insert returned no row");
  const { checkpointId: _, ...metric } = row;
  return metric;
}

function assertTfjs(checkpoint: Checkpoint): NonNullable<Checkpoint["topology"]> {
  assertCheckpointAvailable(checkpoint);
  if (!checkpoint.topology) {
    throw new NotFoundError(
      `checkpoint ${checkpoint.id} has no TF.js topology (only models this service trained do)`,
    );
  }
  return checkpoint.topology;
}

/**
 * The checkpoint as a TF.js layers-model `model.json`. The weights manifest's path is relative
 * (`weights.bin`), so the model loads from the URL it was fetched from (a presigned model.json
 * would break the shard URLs).
 */
export function tfjsModelJson(checkpoint: Checkpoint): object {
  const topology = assertTfjs(checkpoint);
  return {
    format: "layers-model",
    generatedBy: "papa-service",
    convertedBy: null,
    modelTopology: topology.modelTopology,
    weightsManifest: [{ paths: ["weights.bin"], weights: topology.weights }],
  };
}

/**
 * The TF.js weights file: the safetensors data section, which this service writes in manifest
 * order as float32. Its byte range is known once the header's length is read; `open` streams it.
 */
export async function tfjsWeightsOf({
  ctx,
  input,
}: SystemCall<{ checkpoint: Checkpoint }>): Promise<{ range: ByteRange; open(): Promise<Readable> }> {
  assertTfjs(input.checkpoint);
  const { checkpoint } = input;
  const prefix = await readBytes(storeSource(ctx.store, checkpoint.storageKey, checkpoint.sizeBytes), 0, 8);
  const dataStart = 8 + Number(Buffer.from(prefix).readBigUInt64LE(0));
  const range = { start: dataStart, end: checkpoint.sizeBytes };
  return { range, open: () => ctx.store.get(checkpoint.storageKey, range) };
}
