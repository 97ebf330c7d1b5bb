import { Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { and, eq, lt } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import type { MultipartUploads } from "../../storage/object-store.js";
import { SafetensorsError, SafetensorsValidator } from "../../tensors/safetensors.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { ConflictError, InvalidInputError, NotFoundError, PayloadTooLargeError } from "../errors.js";
import { type Checkpoint, checkpointKey, getCheckpoint } from "./checkpoints.js";
import { outputRow } from "./outputs.js";

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

async function sessionOf(ctx: ServiceContext, tenantId: string, id: string): Promise<UploadSession> {
  const [session] = await ctx.db
    .select()
    .from(schema.uploadSessions)
    .where(and(eq(schema.uploadSessions.id, id), eq(schema.uploadSessions.tenantId, tenantId)));
  if (!session) throw new NotFoundError(`upload session ${id} not found`);
  return session;
}

/**
 * Completes a session: assembles the parts, validates the object like any upload (strict
 * safetensors, sha256, exact size) and registers the checkpoint. An invalid object is deleted.
 */
export async function completeUploadSession({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string; parts: { partNumber: number; etag: string }[] }>): Promise<Checkpoint> {
  const multipart = multipartOf(ctx);
  const session = await sessionOf(ctx, principal.tenantId, input.id);
  await multipart.complete(session.storageKey, session.uploadId, input.parts);
  const validator = new SafetensorsValidator({
    maxHeaderBytes: ctx.limits.maxSafetensorsHeaderBytes,
    maxBytes: ctx.limits.maxUploadBytes,
  });
  try {
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
      await tx.insert(schema.checkpoints).values(row);
      await tx.delete(schema.uploadSessions).where(eq(schema.uploadSessions.id, session.id));
    });
  } catch (err) {
    await ctx.store.delete(session.storageKey);
    await ctx.db.delete(schema.uploadSessions).where(eq(schema.uploadSessions.id, session.id));
    if (err instanceof SafetensorsError)
      throw new InvalidInputError(`not a valid safetensors file: ${err.message}`);
    throw err;
  }
  return getCheckpoint({ ctx, principal, input: { id: session.id } });
}

/** Aborts a session: the parts are discarded and nothing is registered. */
export async function abortUploadSession({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string }>): Promise<void> {
  const multipart = multipartOf(ctx);
  const session = await sessionOf(ctx, principal.tenantId, input.id);
  await ctx.db.delete(schema.uploadSessions).where(eq(schema.uploadSessions.id, session.id));
  await multipart.abort(session.storageKey, session.uploadId).catch((err: unknown) => {
    ctx.logger.warn("aborting a multipart upload failed; the bucket lifecycle rule will remove it", {
      error: err,
    });
  });
}

/** Aborts sessions past their expiry (workers run it at start); returns how many. */
export async function expireUploadSessions(ctx: ServiceContext): Promise<number> {
  if (!ctx.store.multipart) return 0;
  const expired = await ctx.db
    .delete(schema.uploadSessions)
    .where(lt(schema.uploadSessions.expiresAt, new Date()))
    .returning();
  for (const s of expired) {
    await ctx.store.multipart.abort(s.storageKey, s.uploadId).catch(() => undefined);
  }
  return expired.length;
}
