import { Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { and, eq, lt, or } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import type { MultipartUploads } from "../../storage/object-store.js";
import { SafetensorsError, SafetensorsValidator } from "../../tensors/safetensors.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { ConflictError, InvalidInputError, NotFoundError, PayloadTooLargeError } from "../errors.js";
import { type Checkpoint, checkpointKey, getCheckpoint } from "./checkpoints.js";
import { outputRow } from "./outputs.js";
import { insertCheckpoints } from "./registry.js";

/** S3's limits: parts of at least 5 MiB (but the last), at most 10,000 parts. */
const MIN_PART_BYTES = 8 * 1024 * 1024;
const MAX_PARTS = 10_000;

export type UploadSession = typeof schema.uploadSessions.$inferSelect;

function multipartOf(ctx: ServiceContext): MultipartUploads {
  if (!ctx.store.multipart) {
    throw new ConflictError(
      "upload sessions need the S3 store; on this deployment upload with POST /v1/checkpoints",
    );
  }
  return ctx.store.multipart;
}

/**
 * Starts a presigned multipart upload: the client PUTs each part to its URL (straight to S3, no
 * request body through the API), then completes the session. The session's id becomes the
 * checkpoint's id.
 */
export async function createUploadSession({
  ctx,
  principal,
  input,
}: TenantCall<{ name: string; sizeBytes: number }>): Promise<{ session: UploadSession; partUrls: string[] }> {
  const multipart = multipartOf(ctx);
  const { maxUploadBytes } = ctx.limits;
  if (input.sizeBytes > maxUploadBytes) {
    throw new PayloadTooLargeError(
      `the upload is ${input.sizeBytes} bytes; the limit is ${maxUploadBytes} bytes`,
      {
        limit_bytes: maxUploadBytes,
      },
    );
  }
  const partSize = Math.max(MIN_PART_BYTES, Math.ceil(input.sizeBytes / MAX_PARTS));
  const parts = Math.max(1, Math.ceil(input.sizeBytes / partSize));
  const id = newId();
  const key = checkpointKey(principal.tenantId, id);
  const uploadId = await multipart.create(key);
  const expires = ctx.presignExpiresSeconds;
  const partUrls = await Promise.all(
    Array.from({ length: parts }, (_, i) => multipart.presignPart(key, uploadId, i + 1, expires)),
  );
  const [session] = await ctx.db
    .insert(schema.uploadSessions)
    .values({
      id,
      tenantId: principal.tenantId,
      name: input.name,
      storageKey: key,
      uploadId,
      sizeBytes: input.sizeBytes,
      partSize,
      expiresAt: new Date(Date.now() + expires * 1000),
    })
    .returning();
  if (!session) throw new Error("upload session insert returned no row");
  return { session, partUrls };
}

/** The session `id` of the tenant, while it is open (no request has claimed its completion). */
function openSession(tenantId: string, id: string) {
  return and(
    eq(schema.uploadSessions.id, id),
    eq(schema.uploadSessions.tenantId, tenantId),
    eq(schema.uploadSessions.status, "open"),
  );
}

async function sessionOf(ctx: ServiceContext, tenantId: string, id: string): Promise<UploadSession> {
  const [session] = await ctx.db
    .select()
    .from(schema.uploadSessions)
    .where(and(eq(schema.uploadSessions.id, id), eq(schema.uploadSessions.tenantId, tenantId)));
  if (!session) throw new NotFoundError(`upload session ${id} not found`);
  return session;
}

/**
 * Completes a session, exactly once: one request claims it (a single state transition, `open` to
 * `completing`), assembles the parts, validates the object like any upload (strict safetensors,
 * sha256, exact size) and registers the checkpoint; an invalid object is deleted with the
 * session. Another request for the same session meanwhile is a conflict; one after it gets the
 * same checkpoint (`created` false). An object that was registered is never deleted.
 */
export async function completeUploadSession({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string; parts: { partNumber: number; etag: string }[] }>): Promise<{
  checkpoint: Checkpoint;
  created: boolean;
}> {
  const multipart = multipartOf(ctx);
  const [session] = await ctx.db
    .update(schema.uploadSessions)
    .set({ status: "completing" })
    .where(openSession(principal.tenantId, input.id))
    .returning();
  if (!session) {
    return { checkpoint: await completedOrBusy(ctx, principal.tenantId, input.id), created: false };
  }
  let assembled = false;
  try {
    await multipart.complete(session.storageKey, session.uploadId, input.parts);
    assembled = true;
    const validator = new SafetensorsValidator({
      maxHeaderBytes: ctx.limits.maxSafetensorsHeaderBytes,
      maxBytes: ctx.limits.maxUploadBytes,
    });
    // The validator sees every byte; the bytes themselves go nowhere.
    await pipeline(
      await ctx.store.get(session.storageKey),
      validator,
      new Writable({ write: (_c, _e, done) => done() }),
    );
    const summary = validator.summary();
    if (summary.sizeBytes !== session.sizeBytes) {
      throw new InvalidInputError(
        `the parts hold ${summary.sizeBytes} bytes; the session announced ${session.sizeBytes}`,
      );
    }
    await ctx.db.transaction(async (tx) => {
      const row = outputRow({
        id: session.id,
        tenantId: session.tenantId,
        name: session.name,
        jobId: null,
        summary,
      });
      await insertCheckpoints(tx, [row]);
      await tx.delete(schema.uploadSessions).where(eq(schema.uploadSessions.id, session.id));
    });
  } catch (err) {
    // Only the claimer gets here, and nothing was registered: the object is this session's alone.
    if (assembled) await ctx.store.delete(session.storageKey);
    else await multipart.abort(session.storageKey, session.uploadId).catch(() => undefined);
    await ctx.db.delete(schema.uploadSessions).where(eq(schema.uploadSessions.id, session.id));
    if (err instanceof SafetensorsError)
      throw new InvalidInputError(`not a valid safetensors file: ${err.message}`);
    throw err;
  }
  return { checkpoint: await getCheckpoint({ ctx, principal, input: { id: session.id } }), created: true };
}

/**
 * For a session that could not be claimed: a conflict while another request is completing it;
 * once it is gone, its checkpoint, when an earlier request completed it, or not found. The
 * session is read first: the completer registers the checkpoint and deletes the session in one
 * transaction, so a session gone means a checkpoint there (read the other way round, a
 * completion committing between the two reads answered 404).
 */
async function completedOrBusy(ctx: ServiceContext, tenantId: string, id: string): Promise<Checkpoint> {
  const session = await sessionOf(ctx, tenantId, id).catch((err: unknown) => {
    if (err instanceof NotFoundError) return null;
    throw err;
  });
  if (session) {
    throw new ConflictError(`upload session ${id} is being completed by another request; ask again shortly`);
  }
  return getCheckpoint({ ctx, principal: { tenantId }, input: { id } }).catch((err: unknown) => {
    throw err instanceof NotFoundError ? new NotFoundError(`upload session ${id} not found`) : err;
  });
}

/** Aborts a session: the parts are discarded and nothing is registered. Not one being completed (409). */
export async function abortUploadSession({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string }>): Promise<void> {
  const multipart = multipartOf(ctx);
  const [session] = await ctx.db
    .delete(schema.uploadSessions)
    .where(openSession(principal.tenantId, input.id))
    .returning();
  if (!session) {
    await sessionOf(ctx, principal.tenantId, input.id); // 404 unless it exists
    throw new ConflictError(`upload session ${input.id} is being completed; it can no longer be aborted`);
  }
  await multipart.abort(session.storageKey, session.uploadId).catch((err: unknown) => {
    ctx.logger.warn("aborting a multipart upload failed; the bucket lifecycle rule will remove it", {
      error: err,
    });
  });
}

/** How long past its expiry a session being completed is left to the request completing it. */
const COMPLETION_GRACE_MS = 60 * 60 * 1000;

/**
 * Aborts sessions past their expiry (workers run it periodically); returns how many. A session
 * still being completed gets an hour more; past that its completer died, and the object it
 * assembled goes too, unless it was registered.
 */
export async function expireUploadSessions(ctx: ServiceContext): Promise<number> {
  const { multipart } = ctx.store;
  if (!multipart) return 0;
  const now = Date.now();
  const expired = await ctx.db
    .delete(schema.uploadSessions)
    .where(
      or(
        and(eq(schema.uploadSessions.status, "open"), lt(schema.uploadSessions.expiresAt, new Date(now))),
        lt(schema.uploadSessions.expiresAt, new Date(now - COMPLETION_GRACE_MS)),
      ),
    )
    .returning();
  for (const s of expired) {
    await multipart.abort(s.storageKey, s.uploadId).catch(() => undefined);
    if (s.status !== "completing") continue;
    const [registered] = await ctx.db
      .select({ id: schema.checkpoints.id })
      .from(schema.checkpoints)
      .where(eq(schema.checkpoints.id, s.id));
    if (!registered) await ctx.store.delete(s.storageKey);
  }
  return expired.length;
}
