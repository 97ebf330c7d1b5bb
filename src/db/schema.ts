import { sql } from "drizzle-orm";
import {
  bigint,
  boolean,
  doublePrecision,
  index,
  integer,
  jsonb,
  pgEnum,
  pgTable,
  primaryKey,
  real,
  text,
  timestamp,
  uniqueIndex,
  uuid,
} from "drizzle-orm/pg-core";

const createdAt = () => timestamp("created_at", { withTimezone: true }).notNull().defaultNow();

export const tenants = pgTable("tenants", {
  id: uuid("id").primaryKey(),
  name: text("name").notNull(),
  createdAt: createdAt(),
});

/** Only the sha256 of each key is stored; the key itself is shown once, at creation. */
export const apiKeys = pgTable(
  "api_keys",
  {
    id: uuid("id").primaryKey(),
    tenantId: uuid("tenant_id")
      .notNull()
      .references(() => tenants.id),
    name: text("name"),
    prefix: text("prefix").notNull(),
    keyHash: text("key_hash").notNull(),
    createdAt: createdAt(),
    revokedAt: timestamp("revoked_at", { withTimezone: true }),
  },
  (t) => [
    uniqueIndex("api_keys_key_hash_idx").on(t.keyHash),
    index("api_keys_tenant_idx").on(t.tenantId, t.id),
  ],
);

export const jobKind = pgEnum("job_kind", ["merge", "train"]);
export const jobStatus = pgEnum("job_status", ["queued", "running", "succeeded", "failed", "canceled"]);

export const jobs = pgTable(
  "jobs",
  {
    id: uuid("id").primaryKey(),
    tenantId: uuid("tenant_id")
      .notNull()
      .references(() => tenants.id),
    kind: jobKind("kind").notNull(),
    status: jobStatus("status").notNull().default("queued"),
    progress: real("progress").notNull().default(0),
    /** What the worker last reported beyond the fraction (epoch, step, loss, examples/s). */
    progressDetail: jsonb("progress_detail"),
    params: jsonb("params").notNull(),
    result: jsonb("result"),
    problem: jsonb("problem"),
    idempotencyKey: text("idempotency_key"),
    createdAt: createdAt(),
    startedAt: timestamp("started_at", { withTimezone: true }),
    finishedAt: timestamp("finished_at", { withTimezone: true }),
    updatedAt: timestamp("updated_at", { withTimezone: true }).notNull().defaultNow(),
    /** When it was handed to the queue; null while it waits for a free slot of its tenant. */
    dispatchedAt: timestamp("dispatched_at", { withTimezone: true }),
  },
  (t) => [
    uniqueIndex("jobs_idempotency_idx")
      .on(t.tenantId, t.idempotencyKey)
      .where(sql`${t.idempotencyKey} is not null`),
    index("jobs_tenant_idx").on(t.tenantId, t.id),
    index("jobs_active_idx").on(t.tenantId, t.id).where(sql`${t.status} in ('queued', 'running')`),
  ],
);

export const checkpoints = pgTable(
  "checkpoints",
  {
    id: uuid("id").primaryKey(),
    tenantId: uuid("tenant_id")
      .notNull()
      .references(() => tenants.id),
    /** The model (`models`) it is a version of. */
    name: text("name").notNull(),
    /** Its version of the model: 1, 2, ... in order of registration. */
    version: integer("version").notNull(),
    tags: text("tags").array().notNull().default(sql`'{}'::text[]`),
    description: text("description"),
    format: text("format").notNull().default("safetensors"),
    sizeBytes: bigint("size_bytes", { mode: "number" }).notNull(),
    sha256: text("sha256").notNull(),
    tensorCount: integer("tensor_count").notNull(),
    parameterCount: bigint("parameter_count", { mode: "number" }).notNull(),
    dtypes: text("dtypes").array().notNull(),
    metadata: jsonb("metadata").$type<Record<string, string>>(),
    /** TF.js model topology, for models this service trained. */
    topology: jsonb("topology"),
    /**
     * Where the bytes are: the one file `model.safetensors` itself, or (`files` set) the prefix
     * its files are under.
     */
    storageKey: text("storage_key").notNull(),
    /** A multi-file checkpoint's files (null: the one file `model.safetensors` at `storageKey`). */
    files: jsonb("files").$type<{ name: string; sizeBytes: number; sha256: string }[]>(),
    jobId: uuid("job_id").references(() => jobs.id),
    /** Set on a population's outputs: the round's next weights of `populationMember`, or (member null) its final soup. */
    populationId: uuid("population_id"),
    populationRound: integer("population_round"),
    populationMember: integer("population_member"),
    createdAt: createdAt(),
    deletedAt: timestamp("deleted_at", { withTimezone: true }),
  },
  (t) => [
    index("checkpoints_tenant_idx").on(t.tenantId, t.id),
    uniqueIndex("checkpoints_version_idx").on(t.tenantId, t.name, t.version),
    index("checkpoints_name_prefix_idx").using("btree", t.tenantId, sql`${t.name} text_pattern_ops`, t.id),
    index("checkpoints_job_idx").on(t.jobId),
    index("checkpoints_storage_key_idx").on(t.storageKey),
    index("checkpoints_population_idx")
      .on(t.populationId, t.populationRound)
      .where(sql`${t.populationId} is not null`),
  ],
);

/**
 * The index of `checkpoints.tags` for search: one row per tag of each checkpoint, in the order a
 * search pages by (newest first within a tenant's tag), whatever the tag's frequency.
 */
export const checkpointTags = pgTable(
  "checkpoint_tags",
  {
    tenantId: uuid("tenant_id").notNull(),
    tag: text("tag").notNull(),
    checkpointId: uuid("checkpoint_id")
      .notNull()
      .references(() => checkpoints.id),
  },
  (t) => [
    primaryKey({ columns: [t.tenantId, t.tag, t.checkpointId] }),
    index("checkpoint_tags_checkpoint_idx").on(t.checkpointId),
  ],
);

/**
 * Each tenant's count of changes to its checkpoints as the API shows them (their rows, tags,
 * lineage and metrics), bumped by triggers in the transaction of each change (migration 0010):
 * a body read while the count did not move is exact for as long as it does not move.
 */
export const checkpointChanges = pgTable("checkpoint_changes", {
  tenantId: uuid("tenant_id")
    .primaryKey()
    .references(() => tenants.id),
  changes: bigint("changes", { mode: "number" }).notNull(),
});

/** child = sum over parents of coefficient x parent, produced by `method` in `job`. */
export const lineageEdges = pgTable(
  "lineage_edges",
  {
    parentId: uuid("parent_id")
      .notNull()
      .references(() => checkpoints.id),
    childId: uuid("child_id")
      .notNull()
      .references(() => checkpoints.id),
    coefficient: doublePrecision("coefficient").notNull(),
    method: text("method").notNull(),
    jobId: uuid("job_id").references(() => jobs.id),
    createdAt: createdAt(),
  },
  (t) => [primaryKey({ columns: [t.parentId, t.childId] }), index("lineage_child_idx").on(t.childId)],
);

/**
 * Every value recorded for a checkpoint, kept; `current` marks the latest of each (dataset,
 * split, name), the one searches filter and sort by.
 */
export const metrics = pgTable(
  "metrics",
  {
    id: uuid("id").primaryKey(),
    tenantId: uuid("tenant_id")
      .notNull()
      .references(() => tenants.id),
    checkpointId: uuid("checkpoint_id")
      .notNull()
      .references(() => checkpoints.id),
    dataset: text("dataset").notNull(),
    split: text("split").notNull(),
    name: text("name").notNull(),
    value: doublePrecision("value").notNull(),
    jobId: uuid("job_id").references(() => jobs.id),
    current: boolean("current").notNull().default(true),
    createdAt: createdAt(),
  },
  (t) => [
    index("metrics_checkpoint_idx").on(t.checkpointId),
    uniqueIndex("metrics_current_idx")
      .on(t.checkpointId, t.dataset, t.split, t.name)
      .where(sql`${t.current}`),
    index("metrics_search_idx")
      .on(t.tenantId, t.dataset, t.split, t.name, t.value, t.checkpointId)
      .where(sql`${t.current}`),
  ],
);

/** A tenant's model: a name whose checkpoints are its versions. `latestVersion` counts them out. */
export const models = pgTable(
  "models",
  {
    tenantId: uuid("tenant_id")
      .notNull()
      .references(() => tenants.id),
    name: text("name").notNull(),
    latestVersion: integer("latest_version").notNull(),
    createdAt: createdAt(),
  },
  (t) => [primaryKey({ columns: [t.tenantId, t.name] })],
);

/** A user's name for one version of a model (`production`, `staging`); `latest` is not stored. */
export const modelAliases = pgTable(
  "model_aliases",
  {
    tenantId: uuid("tenant_id").notNull(),
    name: text("name").notNull(),
    alias: text("alias").notNull(),
    version: integer("version").notNull(),
    updatedAt: timestamp("updated_at", { withTimezone: true }).notNull().defaultNow(),
  },
  (t) => [primaryKey({ columns: [t.tenantId, t.name, t.alias] })],
);

/** Datasets uploaded by tenants (IDX or CIFAR-10 binary), validated on upload; files in the object store. */
export const datasets = pgTable(
  "datasets",
  {
    id: uuid("id").primaryKey(),
    tenantId: uuid("tenant_id")
      .notNull()
      .references(() => tenants.id),
    name: text("name").notNull(),
    format: text("format").notNull(),
    /** [height, width, channels] */
    shape: jsonb("shape").$type<[number, number, number]>().notNull(),
    classes: integer("classes").notNull(),
    trainCount: integer("train_count").notNull(),
    testCount: integer("test_count").notNull(),
    sizeBytes: bigint("size_bytes", { mode: "number" }).notNull(),
    /** Object-store keys of the files, by role (train_images, train_labels, ... or train, test). */
    files: jsonb("files").$type<Record<string, string[]>>().notNull(),
    createdAt: createdAt(),
  },
  (t) => [index("datasets_tenant_idx").on(t.tenantId, t.id)],
);

export const uploadSessionStatus = pgEnum("upload_session_status", ["open", "completing"]);

/**
 * A presigned multipart upload in progress (S3 store); its id becomes the checkpoint's id.
 * `completing`: one request has claimed its completion (the only one that may assemble,
 * validate, register or delete its object); the row goes once the checkpoint is registered.
 */
export const uploadSessions = pgTable(
  "upload_sessions",
  {
    id: uuid("id").primaryKey(),
    tenantId: uuid("tenant_id")
      .notNull()
      .references(() => tenants.id),
    name: text("name").notNull(),
    storageKey: text("storage_key").notNull(),
    uploadId: text("upload_id").notNull(),
    sizeBytes: bigint("size_bytes", { mode: "number" }).notNull(),
    partSize: bigint("part_size", { mode: "number" }).notNull(),
    status: uploadSessionStatus("status").notNull().default("open"),
    expiresAt: timestamp("expires_at", { withTimezone: true }).notNull(),
    createdAt: createdAt(),
  },
  (t) => [index("upload_sessions_expiry_idx").on(t.expiresAt)],
);

/** Counters of rate-limiter-flexible (per key, per client address), shared by every API instance. */
export const rateLimits = pgTable("rate_limits", {
  key: text("key").primaryKey(),
  points: integer("points").notNull().default(0),
  expire: timestamp("expire", { withTimezone: true }),
});

/**
 * A population whose members train anywhere and meet at rounds (`populationRounds`): each round,
 * members submit their weights and get back PAPA's averages. `finishJobId`: the merge job of
 * its final soup, once asked for; no submission is taken after.
 */
export const populations = pgTable(
  "populations",
  {
    id: uuid("id").primaryKey(),
    tenantId: uuid("tenant_id")
      .notNull()
      .references(() => tenants.id),
    name: text("name").notNull(),
    size: integer("size").notNull(),
    method: text("method").notNull(),
    alpha: doublePrecision("alpha").notNull(),
    seed: bigint("seed", { mode: "number" }).notNull(),
    quorum: integer("quorum").notNull(),
    roundTimeoutSeconds: integer("round_timeout_seconds").notNull(),
    initialCheckpointId: uuid("initial_checkpoint_id").references(() => checkpoints.id),
    currentRound: integer("current_round").notNull().default(0),
    finishJobId: uuid("finish_job_id").references(() => jobs.id),
    createdAt: createdAt(),
  },
  (t) => [index("populations_tenant_idx").on(t.tenantId, t.id)],
);

/**
 * A round of a population, from its opening. Its state is its merge job's: none yet (open),
 * queued or running (merging), succeeded (closed), failed or canceled (failed).
 */
export const populationRounds = pgTable(
  "population_rounds",
  {
    populationId: uuid("population_id")
      .notNull()
      .references(() => populations.id),
    round: integer("round").notNull(),
    openedAt: timestamp("opened_at", { withTimezone: true }).notNull().defaultNow(),
    jobId: uuid("job_id").references(() => jobs.id),
  },
  (t) => [
    primaryKey({ columns: [t.populationId, t.round] }),
    index("population_rounds_open_idx").on(t.openedAt).where(sql`${t.jobId} is null`),
  ],
);

/** Member `member`'s weights at the end of its training for `round`. */
export const populationSubmissions = pgTable(
  "population_submissions",
  {
    populationId: uuid("population_id")
      .notNull()
      .references(() => populations.id),
    round: integer("round").notNull(),
    member: integer("member").notNull(),
    checkpointId: uuid("checkpoint_id")
      .notNull()
      .references(() => checkpoints.id),
    createdAt: createdAt(),
  },
  (t) => [primaryKey({ columns: [t.populationId, t.round, t.member] })],
);
