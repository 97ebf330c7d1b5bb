import type { Readable } from "node:stream";
import { and, asc, desc, eq, getTableColumns, gt, gte, inArray, isNull, lt, lte, sql } from "drizzle-orm";
import { alias } from "drizzle-orm/pg-core";
import { type Database, preparedQuery, schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import type { TfjsTopology } from "../../ml/export.js";
import type { ByteRange } from "../../storage/object-store.js";
import { SafetensorsError, SafetensorsValidator } from "../../tensors/safetensors.js";
import type { ServiceContext, SystemCall, TenantCall } from "../context.js";
import { GoneError, InvalidInputError, NotFoundError, PayloadTooLargeError } from "../errors.js";
import { idCursor, isUuid, type Page, pageByKey } from "../pagination.js";
import { pipeUpload } from "../upload-stream.js";
import {
  type CheckpointFile,
  deleteStored,
  fileKey,
  INDEX_FILE,
  isSharded,
  storedFiles,
  WEIGHTS_FILE,
} from "./files.js";
import { outputRow } from "./outputs.js";
import { insertCheckpoints, insertMetrics } from "./registry.js";

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
  /** Whether it is the latest value of its (dataset, split, name) for its checkpoint. */
  current: boolean;
  jobId: string | null;
  createdAt: Date;
}

export interface Checkpoint {
  id: string;
  /** The model it is a version of. */
  name: string;
  version: number;
  tags: string[];
  description: string | null;
  format: string;
  sizeBytes: number;
  sha256: string;
  tensorCount: number;
  parameterCount: number;
  dtypes: string[];
  metadata: Record<string, string> | null;
  /** Whether it has a TF.js topology and weight manifest (models this service trained do). */
  hasTopology: boolean;
  jobId: string | null;
  /** A population's output: its round, and the member it is for (null: the final soup). */
  population: { id: string; round: number; member: number | null } | null;
  parents: CheckpointParent[];
  metrics: Metric[];
  createdAt: Date;
  deletedAt: Date | null;
  /** Its files: `model.safetensors`, or shards and their index; and companion files. */
  files: CheckpointFile[];
  /** Where the bytes are in the object store (`fileKey`); never shown to clients. */
  storageKey: string;
}

/** Object-store key of a checkpoint's bytes; derived from ids so a retried write lands in one place. */
export function checkpointKey(tenantId: string, checkpointId: string): string {
  return `tenants/${tenantId}/checkpoints/${checkpointId}.safetensors`;
}

/** Object-store prefix of a multi-file checkpoint's files. */
export function checkpointPrefix(tenantId: string, checkpointId: string): string {
  return `tenants/${tenantId}/checkpoints/${checkpointId}/`;
}

/**
 * A checkpoint's row as reads take it: whether it has a TF.js topology, not the topology itself
 * (5 KB of JSON for our CNN, 37 KB for a ResNet-20), which only its model.json needs.
 */
type Row = Omit<typeof schema.checkpoints.$inferSelect, "topology"> & { hasTopology: boolean };

function toCheckpoint(row: Row, parents: CheckpointParent[], metrics: Metric[]): Checkpoint {
  return {
    id: row.id,
    name: row.name,
    version: row.version,
    tags: row.tags,
    description: row.description,
    format: row.format,
    sizeBytes: row.sizeBytes,
    sha256: row.sha256,
    tensorCount: row.tensorCount,
    parameterCount: row.parameterCount,
    dtypes: row.dtypes,
    metadata: row.metadata ?? null,
    hasTopology: row.hasTopology,
    jobId: row.jobId,
    population:
      row.populationId === null
        ? null
        : { id: row.populationId, round: row.populationRound ?? 0, member: row.populationMember },
    parents,
    metrics,
    createdAt: row.createdAt,
    deletedAt: row.deletedAt,
    ...storedFiles(row),
  };
}

/** A metrics row as the service shows it: without the keys it is found by. */
function toMetric({ checkpointId: _, tenantId: __, ...metric }: typeof schema.metrics.$inferSelect): Metric {
  return metric;
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
  for (const row of rows) {
    byCheckpoint.set(row.checkpointId, [...(byCheckpoint.get(row.checkpointId) ?? []), toMetric(row)]);
  }
  return byCheckpoint;
}

const e = schema.lineageEdges;
const m = schema.metrics;
/** The outer row's column, qualified: in a selection drizzle writes columns without their table. */
const outer = (column: string) => sql`${schema.checkpoints}.${sql.identifier(column)}`;
const outerCheckpointId = outer("id");
const { topology: _, ...checkpointColumns } = getTableColumns(schema.checkpoints);

type MetricJson = Omit<Metric, "createdAt"> & { createdAt: string };

/**
 * A checkpoint's columns (whether it has a topology, not the topology) with its parents (by
 * parent id) and metrics (oldest first) as JSON arrays: one query for a page of checkpoints,
 * not three.
 */
const withRelations = {
  ...checkpointColumns,
  hasTopology: sql<boolean>`${outer("topology")} is not null`,
  parents: sql<CheckpointParent[]>`coalesce((select json_agg(json_build_object(
    'checkpointId', ${e.parentId}, 'coefficient', ${e.coefficient}, 'method', ${e.method}, 'jobId', ${e.jobId}
  ) order by ${e.parentId}) from ${e} where ${e.childId} = ${outerCheckpointId}), '[]')`,
  metrics: sql<MetricJson[]>`coalesce((select json_agg(json_build_object(
    'id', ${m.id}, 'dataset', ${m.dataset}, 'split', ${m.split}, 'name', ${m.name}, 'value', ${m.value},
    'current', ${m.current}, 'jobId', ${m.jobId}, 'createdAt', ${m.createdAt}
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
  refuseDeclaredSize(input.declaredBytes, maxUploadBytes, 0);
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
    const [row] = await ctx.db.transaction((tx) =>
      insertCheckpoints(tx, [
        outputRow({ id, tenantId: principal.tenantId, name: input.name, jobId: null, summary }),
      ]),
    );
    if (!row) throw new Error("checkpoint insert returned no row");
    return toCheckpoint({ ...row, hasTopology: row.topology !== null }, [], []);
  } catch (err) {
    await ctx.store.delete(key);
    throw err;
  }
}

/**
 * Refuses an upload whose declared length (`Content-Length`) is over the limit, plus `framing`
 * bytes of the body that are not the files'. The body is left unread: the caller answers first,
 * then drops the connection.
 */
export function refuseDeclaredSize(declaredBytes: number | undefined, limit: number, framing: number): void {
  if (declaredBytes !== undefined && declaredBytes > limit + framing) {
    throw new PayloadTooLargeError(`the upload is ${declaredBytes} bytes; the limit is ${limit} bytes`, {
      limit_bytes: limit,
    });
  }
}

/** A failed upload's reason as the error to answer: a safetensors problem is 413 or 422. */
export function asUploadError(reason: unknown, maxUploadBytes: number, maxHeaderBytes: number): unknown {
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

export interface CheckpointSearch {
  limit: number;
  cursor?: string | undefined;
  name?: string | undefined;
  namePrefix?: string | undefined;
  /** Checkpoints with every one of these tags. */
  tags?: string[] | undefined;
  jobId?: string | undefined;
  /** Checkpoints averaged (merged or pulled) from this one. */
  parentId?: string | undefined;
  /** Checkpoints with a current value of this metric, within [min, max]. */
  metric?: {
    dataset: string;
    split: string;
    name: string;
    min?: number | undefined;
    max?: number | undefined;
  };
  /**
   * `-` first: descending. `metric` sorts by the value of `metric`, ties in id order;
   * `-version` (with `name`) by version number.
   */
  sort: "created_at" | "-created_at" | "metric" | "-metric" | "-version";
}

/** What a search's query depends on: which filters it has, not their values. */
interface SearchShape {
  after: boolean;
  name: boolean;
  namePrefix: boolean;
  tags: number;
  job: boolean;
  parent: boolean;
  metric: boolean;
  min: boolean;
  max: boolean;
  sort: CheckpointSearch["sort"];
}

const sortValue = alias(schema.metrics, "sort_metric");

function buildSearch(db: Database, s: SearchShape, name: string) {
  const c = schema.checkpoints;
  const v = sortValue;
  const p = sql.placeholder;
  const descending = s.sort.startsWith("-");
  const byMetric = s.sort.endsWith("metric");
  const byVersion = s.sort === "-version";
  const order = descending ? desc : asc;
  const after = descending ? lt : gt;
  const query = db
    .select({ ...withRelations, sortValue: s.metric ? sql<number>`${v.value}` : sql<null>`null` })
    .from(c)
    .$dynamic();
  // Each tag through its index, which walks one tag's checkpoints newest first however many there are.
  for (let i = 0; i < s.tags; i++) {
    const t = alias(schema.checkpointTags, `tag_${i}`);
    query.innerJoin(t, and(eq(t.checkpointId, c.id), eq(t.tenantId, p("tenantId")), eq(t.tag, p(`tag${i}`))));
  }
  if (s.metric) {
    query.innerJoin(
      v,
      and(
        eq(v.checkpointId, c.id),
        eq(v.current, true),
        eq(v.tenantId, p("tenantId")),
        eq(v.dataset, p("metricDataset")),
        eq(v.split, p("metricSplit")),
        eq(v.name, p("metricName")),
      ),
    );
  }
  return query
    .where(
      and(
        eq(c.tenantId, p("tenantId")),
        isNull(c.deletedAt),
        s.name ? eq(c.name, p("name")) : undefined,
        // Byte order (text_pattern_ops): the names that start with the prefix, on the index.
        s.namePrefix ? sql`${c.name} ~>=~ ${p("prefixFrom")} and ${c.name} ~<~ ${p("prefixTo")}` : undefined,
        s.job ? eq(c.jobId, p("jobId")) : undefined,
        s.parent
          ? sql`${c.id} in (select ${e.childId} from ${e} where ${e.parentId} = ${p("parentId")})`
          : undefined,
        s.min ? gte(v.value, p("metricMin")) : undefined,
        s.max ? lte(v.value, p("metricMax")) : undefined,
        s.after && byMetric
          ? sql`(${v.value}, ${v.checkpointId}) ${sql.raw(descending ? "<" : ">")} (${p("afterValue")}::double precision, ${p("afterId")}::uuid)`
          : undefined,
        s.after && byVersion ? lt(c.version, p("afterVersion")) : undefined,
        s.after && !byMetric && !byVersion ? after(c.id, p("afterId")) : undefined,
      ),
    )
    .orderBy(
      ...(byMetric ? [order(v.value), order(v.checkpointId)] : byVersion ? [desc(c.version)] : [order(c.id)]),
    )
    .limit(p("take"))
    .prepare(name);
}

const searches = new Map<string, ReturnType<typeof searchQuery>>();
const searchQuery = (shape: SearchShape, name: string) => preparedQuery((db) => buildSearch(db, shape, name));

/** The prepared query of a search's shape, made at its first use (the shapes are finitely many). */
function preparedSearch(shape: SearchShape): ReturnType<typeof searchQuery> {
  const key = JSON.stringify(shape);
  let query = searches.get(key);
  if (query === undefined) {
    query = searchQuery(shape, `checkpoint_search_${searches.size}`);
    searches.set(key, query);
  }
  return query;
}

type MetricCursor = [number, string];
const metricCursor = {
  key: (row: { sortValue: number | null; id: string }): MetricCursor => [row.sortValue ?? 0, row.id],
  valid: (key: unknown): key is MetricCursor =>
    Array.isArray(key) && key.length === 2 && Number.isFinite(key[0]) && isUuid(key[1]),
};

const versionCursor = {
  key: (row: { version: number }) => row.version,
  valid: (key: unknown): key is number => Number.isInteger(key) && (key as number) > 0,
};

/** The next string in byte order after every string that starts with `prefix`. */
function prefixEnd(prefix: string): string {
  const last = prefix.codePointAt(prefix.length - 1) ?? 0;
  return prefix.slice(0, -1) + String.fromCodePoint(last + 1);
}

/**
 * A page of a tenant's live checkpoints that pass every filter given, in `sort` order (newest
 * first by default). `cursor` is the previous page's `nextCursor`, of the same search.
 */
export async function listCheckpoints({
  ctx,
  principal,
  input,
}: TenantCall<CheckpointSearch>): Promise<Page<Checkpoint>> {
  const byMetric = input.sort.endsWith("metric");
  if (input.sort === "-version" && input.name === undefined) {
    throw new InvalidInputError("sort=-version orders the versions of one model: give its name");
  }
  if (byMetric && !input.metric) {
    throw new InvalidInputError(
      `sort=${input.sort} needs a metric to sort by (metric, metric_dataset, metric_split)`,
    );
  }
  const query = preparedSearch({
    after: input.cursor !== undefined,
    name: input.name !== undefined,
    namePrefix: input.namePrefix !== undefined,
    tags: input.tags?.length ?? 0,
    job: input.jobId !== undefined,
    parent: input.parentId !== undefined,
    metric: input.metric !== undefined,
    min: input.metric?.min !== undefined,
    max: input.metric?.max !== undefined,
    sort: input.sort,
  });
  const values = {
    tenantId: principal.tenantId,
    name: input.name,
    prefixFrom: input.namePrefix,
    prefixTo: input.namePrefix === undefined ? undefined : prefixEnd(input.namePrefix),
    ...Object.fromEntries((input.tags ?? []).map((tag, i) => [`tag${i}`, tag])),
    jobId: input.jobId,
    parentId: input.parentId,
    metricDataset: input.metric?.dataset,
    metricSplit: input.metric?.split,
    metricName: input.metric?.name,
    metricMin: input.metric?.min,
    metricMax: input.metric?.max,
  };
  const page = byMetric
    ? await pageByKey(input, metricCursor, (after, take) =>
        query(ctx.db).execute({ ...values, afterValue: after?.[0], afterId: after?.[1], take }),
      )
    : input.sort === "-version"
      ? await pageByKey(input, versionCursor, (after, take) =>
          query(ctx.db).execute({ ...values, afterVersion: after, take }),
        )
      : await pageByKey(input, idCursor, (after, take) =>
          query(ctx.db).execute({ ...values, afterId: after, take }),
        );
  return {
    items: page.items.map(({ sortValue: _, ...row }) => withRelationsToCheckpoint(row)),
    nextCursor: page.nextCursor,
  };
}

const changesOfTenant = preparedQuery((db) =>
  db
    .select({ changes: schema.checkpointChanges.changes })
    .from(schema.checkpointChanges)
    .where(eq(schema.checkpointChanges.tenantId, sql.placeholder("tenantId")))
    .prepare("checkpoint_changes_of_tenant"),
);

/**
 * How many times the caller's tenant's checkpoints have changed as the API shows them (rows,
 * tags, lineage, metrics; `checkpoint_changes`): two reads that return the same count saw no
 * change between them.
 */
export async function checkpointChangeCount({ ctx, principal }: Omit<TenantCall, "input">): Promise<number> {
  const [row] = await changesOfTenant(ctx.db).execute({ tenantId: principal.tenantId });
  return row?.changes ?? 0;
}

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
 * Replaces the tags or the description given (null clears one) and leaves the rest; the
 * weights, name and version never change.
 */
export async function updateCheckpoint({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string; tags?: string[] | null; description?: string | null }>): Promise<Checkpoint> {
  const c = schema.checkpoints;
  const tags = input.tags === undefined ? undefined : (input.tags ?? []);
  const changes = {
    ...(tags !== undefined && { tags }),
    ...(input.description !== undefined && { description: input.description }),
  };
  if (Object.keys(changes).length > 0) {
    await ctx.db.transaction(async (tx) => {
      const [updated] = await tx
        .update(c)
        .set(changes)
        .where(and(eq(c.id, input.id), eq(c.tenantId, principal.tenantId)))
        .returning({ id: c.id });
      if (!updated || tags === undefined) return;
      // The tags' search index follows them in the same transaction.
      const t = schema.checkpointTags;
      await tx.delete(t).where(eq(t.checkpointId, input.id));
      if (tags.length > 0) {
        await tx
          .insert(t)
          .values(tags.map((tag) => ({ tenantId: principal.tenantId, tag, checkpointId: input.id })));
      }
    });
  }
  return getCheckpoint({ ctx, principal, input: { id: input.id } });
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
  if (orphaned) await deleteStored(ctx.store, orphaned);
  if (orphaned === null) await getCheckpoint({ ctx, principal, input }); // 404 unless it was already deleted
}

/** Throws `GoneError` for a deleted checkpoint: its record remains, its bytes do not. */
export function assertCheckpointAvailable(checkpoint: Checkpoint): void {
  if (checkpoint.deletedAt) {
    throw new GoneError(`checkpoint ${checkpoint.id} was deleted at ${checkpoint.deletedAt.toISOString()}`);
  }
}

/**
 * One of a checkpoint's files by name (410 once deleted; 404 naming its files when it has no
 * such file, as sharded weights have no `model.safetensors`).
 */
export function checkpointFile(checkpoint: Checkpoint, name: string): CheckpointFile {
  assertCheckpointAvailable(checkpoint);
  const file = checkpoint.files.find((f) => f.name === name);
  if (file) return file;
  const names = checkpoint.files.map((f) => f.name).join(", ");
  throw new NotFoundError(
    name === WEIGHTS_FILE && isSharded(checkpoint)
      ? `checkpoint ${checkpoint.id} holds its weights in shards (${INDEX_FILE} lists them); its files are ${names}`
      : `checkpoint ${checkpoint.id} has no file ${name}; its files are ${names}`,
  );
}

/** Streams one of a checkpoint's files, or `range` of it (which the caller resolved against its size). */
export async function openCheckpointFile({
  ctx,
  input,
}: SystemCall<{
  checkpoint: Checkpoint;
  file: CheckpointFile;
  range?: ByteRange | undefined;
}>): Promise<Readable> {
  return ctx.store.get(fileKey(input.checkpoint, input.file.name), input.range);
}

/** A presigned, time-limited URL to one of the files, or null when the store cannot make one. */
export async function presignCheckpointFile({
  ctx,
  input,
}: SystemCall<{ checkpoint: Checkpoint; file: CheckpointFile; downloadName: string }>): Promise<
  string | null
> {
  return ctx.store.presignGet(fileKey(input.checkpoint, input.file.name), {
    expiresInSeconds: ctx.presignExpiresSeconds,
    fileName: input.downloadName,
  });
}

/**
 * Records a metric measured elsewhere for a checkpoint of the caller's tenant; it becomes the
 * checkpoint's current value of its (dataset, split, name).
 */
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
  const c = schema.checkpoints;
  const [row] = await ctx.db.transaction(async (tx) => {
    // Locked, so that two values of one metric recorded at once take turns at being current.
    const [checkpoint] = await tx
      .select({ id: c.id })
      .from(c)
      .where(and(eq(c.id, input.checkpointId), eq(c.tenantId, principal.tenantId)))
      .for("update");
    if (!checkpoint) throw new NotFoundError(`checkpoint ${input.checkpointId} not found`);
    return insertMetrics(tx, [{ id: newId(), tenantId: principal.tenantId, ...input }]);
  });
  if (!row) throw new Error("metric insert returned no row");
  return toMetric(row);
}

/** 404 for a checkpoint without a TF.js topology, 410 for a deleted one: what cannot be served as TF.js. */
export function assertTfjs(checkpoint: Checkpoint): void {
  assertCheckpointAvailable(checkpoint);
  if (!checkpoint.hasTopology) {
    throw new NotFoundError(
      `checkpoint ${checkpoint.id} has no TF.js topology (only models this service trained do)`,
    );
  }
}

/**
 * The checkpoint as a TF.js layers-model `model.json`. The weights manifest's path is relative
 * (`weights.bin`), so the model loads from the URL it was fetched from (a presigned model.json
 * would break the shard URLs).
 */
export async function tfjsModelJson({ ctx, input }: SystemCall<{ checkpoint: Checkpoint }>): Promise<object> {
  assertTfjs(input.checkpoint);
  const [row] = await ctx.db
    .select({ topology: schema.checkpoints.topology })
    .from(schema.checkpoints)
    .where(eq(schema.checkpoints.id, input.checkpoint.id));
  const topology = row?.topology as TfjsTopology;
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
  const weights = checkpointFile(checkpoint, WEIGHTS_FILE);
  const key = fileKey(checkpoint, WEIGHTS_FILE);
  const prefix = Buffer.alloc(8);
  await ctx.store.read(key, 0, prefix);
  const dataStart = 8 + Number(prefix.readBigUInt64LE(0));
  const range = { start: dataStart, end: weights.sizeBytes };
  return { range, open: () => ctx.store.get(key, range) };
}
