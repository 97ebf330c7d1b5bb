import { and, asc, eq, gt, sql } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { type Checkpoint, getCheckpoint, listCheckpoints } from "../checkpoints/checkpoints.js";
import type { TenantCall } from "../context.js";
import { InvalidInputError, NotFoundError } from "../errors.js";
import { type Page, pageByKey } from "../pagination.js";

export interface ModelSummary {
  name: string;
  /** The highest version whose bytes are not deleted; null when none is left. */
  latestVersion: number | null;
  /** Versions whose bytes are not deleted. */
  versionCount: number;
  createdAt: Date;
}

export interface ModelAlias {
  alias: string;
  version: number;
  checkpointId: string;
  updatedAt: Date;
}

export interface Model extends ModelSummary {
  aliases: ModelAlias[];
  versions: Page<Checkpoint>;
}

/** The alias the service keeps: the highest live version. */
export const LATEST = "latest";

const c = schema.checkpoints;
const models = schema.models;
const aliases = schema.modelAliases;
/** The outer row's columns, qualified: in a selection drizzle writes columns without their table. */
const modelColumn = (column: string) => sql`${models}.${sql.identifier(column)}`;
const liveVersions = sql`from ${c} where ${c.tenantId} = ${modelColumn("tenant_id")} and ${c.name} = ${modelColumn("name")} and ${c.deletedAt} is null`;
const summary = {
  name: models.name,
  createdAt: models.createdAt,
  latestVersion: sql<number | null>`(select max(${c.version}) ${liveVersions})`,
  versionCount: sql<number>`(select count(*)::int ${liveVersions})`,
};

/** The row of one alias of a model. */
const aliasOf = (tenantId: string, name: string, alias: string) =>
  and(eq(aliases.tenantId, tenantId), eq(aliases.name, name), eq(aliases.alias, alias));

/** The checkpoint of one version of a model. */
const versionOf = (tenantId: string, name: string, version: number) =>
  and(eq(c.tenantId, tenantId), eq(c.name, name), eq(c.version, version));

const nameCursor = {
  key: (row: { name: string }) => row.name,
  valid: (key: unknown): key is string => typeof key === "string" && key.length > 0 && key.length <= 96,
};

/** The tenant's models in name order, optionally only those whose name starts with `namePrefix`. */
export async function listModels({
  ctx,
  principal,
  input,
}: TenantCall<{ limit: number; cursor?: string | undefined; namePrefix?: string | undefined }>): Promise<
  Page<ModelSummary>
> {
  const prefix = input.namePrefix;
  return pageByKey(input, nameCursor, (after, take) =>
    ctx.db
      .select(summary)
      .from(models)
      .where(
        and(
          eq(models.tenantId, principal.tenantId),
          prefix === undefined ? undefined : sql`starts_with(${models.name}, ${prefix})`,
          after === undefined ? undefined : gt(models.name, after),
        ),
      )
      .orderBy(asc(models.name))
      .limit(take),
  );
}

/** A model's name, latest live version and count of live versions. */
export async function getModelSummary({
  ctx,
  principal,
  input,
}: TenantCall<{ name: string }>): Promise<ModelSummary> {
  const [model] = await ctx.db
    .select(summary)
    .from(models)
    .where(and(eq(models.tenantId, principal.tenantId), eq(models.name, input.name)));
  if (!model) throw new NotFoundError(`model ${input.name} not found`);
  return model;
}

/** A model with its aliases and a page of its live versions, highest first. */
export async function getModel({
  ctx,
  principal,
  input,
}: TenantCall<{ name: string; limit: number; cursor?: string | undefined }>): Promise<Model> {
  const model = await getModelSummary({ ctx, principal, input });
  const [named, versions] = await Promise.all([
    ctx.db
      .select({
        alias: aliases.alias,
        version: aliases.version,
        checkpointId: c.id,
        updatedAt: aliases.updatedAt,
      })
      .from(aliases)
      .innerJoin(
        c,
        and(eq(c.tenantId, aliases.tenantId), eq(c.name, aliases.name), eq(c.version, aliases.version)),
      )
      .where(and(eq(aliases.tenantId, principal.tenantId), eq(aliases.name, input.name)))
      .orderBy(asc(aliases.alias)),
    listCheckpoints({
      ctx,
      principal,
      input: { limit: input.limit, cursor: input.cursor, name: input.name, sort: "-version" },
    }),
  ]);
  return { ...model, aliases: named, versions };
}

function assertUserAlias(alias: string): void {
  if (alias === LATEST) {
    throw new InvalidInputError(
      `the alias ${LATEST} is kept by the service: it is always the highest live version`,
    );
  }
}

/** Points `alias` at a live version of the model (moving it if it was set). */
export async function setModelAlias({
  ctx,
  principal,
  input,
}: TenantCall<{ name: string; alias: string; version: number }>): Promise<ModelAlias> {
  assertUserAlias(input.alias);
  await getModelSummary({ ctx, principal, input });
  const [target] = await ctx.db
    .select({ id: c.id, deletedAt: c.deletedAt })
    .from(c)
    .where(versionOf(principal.tenantId, input.name, input.version));
  if (!target) throw new InvalidInputError(`model ${input.name} has no version ${input.version}`);
  if (target.deletedAt) throw new InvalidInputError(`version ${input.version} of ${input.name} was deleted`);
  const row = { tenantId: principal.tenantId, name: input.name, alias: input.alias, version: input.version };
  const [set] = await ctx.db
    .insert(aliases)
    .values(row)
    .onConflictDoUpdate({
      target: [aliases.tenantId, aliases.name, aliases.alias],
      set: { version: input.version, updatedAt: sql`now()` },
    })
    .returning({ updatedAt: aliases.updatedAt });
  if (!set) throw new Error(`alias ${input.alias} was not set`);
  return { alias: input.alias, version: input.version, checkpointId: target.id, updatedAt: set.updatedAt };
}

export async function deleteModelAlias({
  ctx,
  principal,
  input,
}: TenantCall<{ name: string; alias: string }>): Promise<void> {
  assertUserAlias(input.alias);
  const deleted = await ctx.db
    .delete(aliases)
    .where(aliasOf(principal.tenantId, input.name, input.alias))
    .returning({ alias: aliases.alias });
  if (deleted.length === 0) throw new NotFoundError(`model ${input.name} has no alias ${input.alias}`);
}

/** The checkpoint a version number or an alias (`latest` included) of a model stands for. */
export async function resolveModelVersion({
  ctx,
  principal,
  input,
}: TenantCall<{ name: string; ref: string }>): Promise<Checkpoint> {
  let version: number | null;
  if (/^[0-9]+$/.test(input.ref)) {
    version = Number(input.ref);
  } else if (input.ref === LATEST) {
    version = (await getModelSummary({ ctx, principal, input })).latestVersion;
    if (version === null)
      throw new NotFoundError(`model ${input.name} has no version left (all were deleted)`);
  } else {
    const [named] = await ctx.db
      .select({ version: aliases.version })
      .from(aliases)
      .where(aliasOf(principal.tenantId, input.name, input.ref));
    if (!named) throw new NotFoundError(`model ${input.name} has no alias ${input.ref}`);
    version = named.version;
  }
  const [row] = await ctx.db
    .select({ id: c.id })
    .from(c)
    .where(versionOf(principal.tenantId, input.name, version));
  if (!row) throw new NotFoundError(`model ${input.name} has no version ${version}`);
  return getCheckpoint({ ctx, principal, input: { id: row.id } });
}

/**
 * A version's commit id in the Hugging Face Hub protocol (40 hex digits, as the Hub's clients
 * require): the checkpoint's id and the version number, so that it resolves back to them.
 */
export function commitOf(checkpoint: Checkpoint): string {
  return checkpoint.id.replaceAll("-", "") + checkpoint.version.toString(16).padStart(8, "0");
}

const COMMIT = /^[0-9a-f]{40}$/;
/** The Hub's name for the newest revision. */
export const MAIN = "main";

/**
 * The checkpoint a Hub revision of a model stands for: `main` (the latest version), a commit id
 * (`commitOf`), a version number or an alias.
 */
export async function resolveRevision({
  ctx,
  principal,
  input,
}: TenantCall<{ name: string; revision: string }>): Promise<Checkpoint> {
  if (!COMMIT.test(input.revision)) {
    const ref = input.revision === MAIN ? LATEST : input.revision;
    return resolveModelVersion({ ctx, principal, input: { name: input.name, ref } });
  }
  const hex = input.revision.slice(0, 32);
  const id = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  const checkpoint = await getCheckpoint({ ctx, principal, input: { id } }).catch((err: unknown) => {
    if (err instanceof NotFoundError) return null;
    throw err;
  });
  if (checkpoint === null || checkpoint.name !== input.name || commitOf(checkpoint) !== input.revision) {
    throw new NotFoundError(`model ${input.name} has no commit ${input.revision}`);
  }
  return checkpoint;
}
