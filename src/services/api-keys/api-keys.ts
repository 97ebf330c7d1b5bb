import { createHash, randomBytes } from "node:crypto";
import { and, count, desc, eq, isNull, sql } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import type { Principal, ServiceContext, SystemCall, TenantCall } from "../context.js";
import { ConflictError, InvalidInputError, NotFoundError, UnauthenticatedError } from "../errors.js";
import { createTenant } from "../tenants/create-tenant.js";

const KEY_PREFIX = "papa_";

/**
 * How long an instance trusts a key it has looked up without asking the database again. A key
 * revoked through one instance stops working there at once, and on the others within this.
 */
export const KEY_TRUST_MS = 1000;

export interface ApiKey {
  id: string;
  tenantId: string;
  name: string | null;
  /** The first characters of the key, enough to recognise it, not to use it. */
  prefix: string;
  createdAt: Date;
  revokedAt: Date | null;
}

/** Keys are looked up by hash; a database leak does not leak usable keys. */
export function hashApiKey(secret: string): string {
  return createHash("sha256").update(secret).digest("hex");
}

function toApiKey(row: typeof schema.apiKeys.$inferSelect): ApiKey {
  return {
    id: row.id,
    tenantId: row.tenantId,
    name: row.name,
    prefix: row.prefix,
    createdAt: row.createdAt,
    revokedAt: row.revokedAt,
  };
}

async function insertKey(ctx: ServiceContext, tenantId: string, name: string | null, secret: string) {
  const [row] = await ctx.db
    .insert(schema.apiKeys)
    .values({
      id: newId(),
      tenantId,
      name,
      prefix: secret.slice(0, KEY_PREFIX.length + 6),
      keyHash: hashApiKey(secret),
    })
    .returning();
  if (!row) throw new Error("api key insert returned no row");
  return toApiKey(row);
}

/** Creates a key for the tenant. The secret is returned here and never again. */
export async function createApiKey({
  ctx,
  principal,
  input,
}: TenantCall<{ name?: string | undefined }>): Promise<{ apiKey: ApiKey; secret: string }> {
  const secret = KEY_PREFIX + randomBytes(32).toString("base64url");
  const apiKey = await insertKey(ctx, principal.tenantId, input.name ?? null, secret);
  return { apiKey, secret };
}

/**
 * Creates a tenant with its first key, in one transaction (the operators' way in: `papa admin
 * create-tenant`). The secret is returned here and never again.
 */
export async function createTenantWithKey({
  ctx,
  input,
}: SystemCall<{ name: string }>): Promise<{ tenantId: string; apiKey: ApiKey; secret: string }> {
  if (!/^\P{Cc}{1,200}$/u.test(input.name)) {
    throw new InvalidInputError("a tenant's name is 1 to 200 printable characters");
  }
  return ctx.db.transaction(async (tx) => {
    const txCtx: ServiceContext = { ...ctx, db: tx };
    const tenant = await createTenant({ ctx: txCtx, input });
    const { apiKey, secret } = await createApiKey({
      ctx: txCtx,
      principal: { tenantId: tenant.id },
      input: { name: "first key (papa admin create-tenant)" },
    });
    return { tenantId: tenant.id, apiKey, secret };
  });
}

export async function listApiKeys({ ctx, principal }: Omit<TenantCall, "input">): Promise<ApiKey[]> {
  const rows = await ctx.db
    .select()
    .from(schema.apiKeys)
    .where(eq(schema.apiKeys.tenantId, principal.tenantId))
    .orderBy(desc(schema.apiKeys.id));
  return rows.map(toApiKey);
}

/**
 * Revokes a key of the caller's tenant; revoking twice is a no-op. Another tenant's key is a 404.
 * The tenant's last active key cannot be revoked (409): without it nobody could call the API for
 * the tenant again. Revocations of one tenant's keys take turns, so that two at once cannot
 * revoke the last two.
 */
export async function revokeApiKey({ ctx, principal, input }: TenantCall<{ id: string }>): Promise<void> {
  await ctx.db.transaction(async (tx) => {
    await tx
      .select({ id: schema.tenants.id })
      .from(schema.tenants)
      .where(eq(schema.tenants.id, principal.tenantId))
      .for("update");
    const [row] = await tx
      .select({ id: schema.apiKeys.id, revokedAt: schema.apiKeys.revokedAt })
      .from(schema.apiKeys)
      .where(and(eq(schema.apiKeys.id, input.id), eq(schema.apiKeys.tenantId, principal.tenantId)));
    if (!row) throw new NotFoundError(`API key ${input.id} not found`);
    if (row.revokedAt) return;
    const [active] = await tx
      .select({ n: count() })
      .from(schema.apiKeys)
      .where(and(eq(schema.apiKeys.tenantId, principal.tenantId), isNull(schema.apiKeys.revokedAt)));
    if ((active?.n ?? 0) <= 1) {
      throw new ConflictError(
        `API key ${input.id} is the tenant's last active key; create another before revoking it`,
      );
    }
    await tx.update(schema.apiKeys).set({ revokedAt: new Date() }).where(eq(schema.apiKeys.id, input.id));
  });
  ctx.knownKeys.clear();
}

/**
 * Resolves a bearer secret to its tenant; unknown and revoked keys are the same error. A key
 * found is trusted for KEY_TRUST_MS; a wrong one is asked about every time.
 */
export async function authenticateApiKey({ ctx, input }: SystemCall<{ secret: string }>): Promise<Principal> {
  const hash = hashApiKey(input.secret);
  const known = ctx.knownKeys.get(hash);
  if (known) return known;
  const [row] = await ctx.db
    .select({ id: schema.apiKeys.id, tenantId: schema.apiKeys.tenantId })
    .from(schema.apiKeys)
    .where(and(eq(schema.apiKeys.keyHash, hash), isNull(schema.apiKeys.revokedAt)));
  if (!row) throw new UnauthenticatedError("the API key is unknown or revoked");
  const principal = { tenantId: row.tenantId, apiKeyId: row.id };
  ctx.knownKeys.set(hash, principal);
  return principal;
}

/**
 * Makes sure someone can call the API after start:
 * - with a configured key, registers it (once) for the default tenant;
 * - without one, on a database that has no key at all, creates one and returns its secret,
 *   so the caller can print it once.
 */
export async function bootstrapApiKey({
  ctx,
  input,
}: SystemCall<{ configuredKey: string | undefined }>): Promise<{ createdSecret: string | null }> {
  return ctx.db.transaction(async (tx) => {
    // One starter at a time: concurrent first starts must not create two default tenants.
    await tx.execute(sqlLock);
    const txCtx: ServiceContext = { ...ctx, db: tx };
    if (input.configuredKey) {
      const [known] = await tx
        .select({ id: schema.apiKeys.id })
        .from(schema.apiKeys)
        .where(eq(schema.apiKeys.keyHash, hashApiKey(input.configuredKey)));
      if (!known)
        await insertKey(txCtx, await defaultTenantId(txCtx), "bootstrap (PAPA_API_KEY)", input.configuredKey);
      return { createdSecret: null };
    }
    const [anyKey] = await tx.select({ id: schema.apiKeys.id }).from(schema.apiKeys).limit(1);
    if (anyKey) return { createdSecret: null };
    const { secret } = await createApiKey({
      ctx: txCtx,
      principal: { tenantId: await defaultTenantId(txCtx) },
      input: { name: "bootstrap" },
    });
    return { createdSecret: secret };
  });
}

const DEFAULT_TENANT = "default";
const sqlLock = sql`select pg_advisory_xact_lock(7243912)`;

async function defaultTenantId(ctx: ServiceContext): Promise<string> {
  const [existing] = await ctx.db
    .select({ id: schema.tenants.id })
    .from(schema.tenants)
    .where(eq(schema.tenants.name, DEFAULT_TENANT))
    .orderBy(schema.tenants.id)
    .limit(1);
  if (existing) return existing.id;
  return (await createTenant({ ctx, input: { name: DEFAULT_TENANT } })).id;
}
