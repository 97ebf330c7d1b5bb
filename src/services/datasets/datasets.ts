import { Readable } from "node:stream";
import { and, desc, eq, lt } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import {
  BUILT_IN_DATASETS,
  type Dataset,
  DatasetError,
  parseUploadedDataset,
  type UploadFormat,
} from "../../ml/datasets.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { InvalidInputError, NotFoundError } from "../errors.js";
import { type Page, pageByIdDesc } from "../pagination.js";

export type DatasetRecord = typeof schema.datasets.$inferSelect;

/**
 * Registers an uploaded dataset after parsing every file completely (shapes, counts, labels).
 * The files go to the object store as uploaded; a rejected upload leaves nothing behind.
 */
export async function createDataset({
  ctx,
  principal,
  input,
}: TenantCall<{
  name: string;
  format: UploadFormat;
  files: Record<string, Uint8Array[]>;
}>): Promise<DatasetRecord> {
  let parsed: Dataset;
  try {
    parsed = parseUploadedDataset(input.name, input.format, input.files);
  } catch (err) {
    throw err instanceof DatasetError
      ? new InvalidInputError(`not a valid ${input.format} dataset: ${err.message}`)
      : err;
  }
  const id = newId();
  const keys: Record<string, string[]> = {};
  const written: string[] = [];
  try {
    for (const [field, list] of Object.entries(input.files)) {
      keys[field] = [];
      for (const [i, bytes] of list.entries()) {
        const key = `tenants/${principal.tenantId}/datasets/${id}/${field}-${i}`;
        written.push(key);
        await ctx.store.put(
          key,
          Readable.from([Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)]),
        );
        keys[field]?.push(key);
      }
    }
    const [row] = await ctx.db
      .insert(schema.datasets)
      .values({
        id,
        tenantId: principal.tenantId,
        name: input.name,
        format: input.format,
        shape: parsed.shape,
        classes: parsed.classes,
        trainCount: parsed.train.count,
        testCount: parsed.test.count,
        sizeBytes: Object.values(input.files)
          .flat()
          .reduce((n, b) => n + b.byteLength, 0),
        files: keys,
      })
      .returning();
    if (!row) throw new Error("dataset insert returned no row");
    return row;
  } catch (err) {
    await Promise.all(written.map((k) => ctx.store.delete(k).catch(() => undefined)));
    throw err;
  }
}

export async function getDataset({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string }>): Promise<DatasetRecord> {
  const [row] = await ctx.db
    .select()
    .from(schema.datasets)
    .where(and(eq(schema.datasets.id, input.id), eq(schema.datasets.tenantId, principal.tenantId)));
  if (!row) throw new NotFoundError(`dataset ${input.id} not found`);
  return row;
}

/**
 * Checks, when a job is submitted, that the dataset it names can be loaded: a built-in dataset,
 * or one the tenant uploaded (another tenant's is as unknown as a missing one). 422 otherwise.
 */
export async function assertDatasetExists({
  ctx,
  principal,
  input,
}: TenantCall<{ dataset: string }>): Promise<void> {
  if ((BUILT_IN_DATASETS as readonly string[]).includes(input.dataset)) return;
  await getDataset({ ctx, principal, input: { id: input.dataset } }).catch((err: unknown) => {
    throw err instanceof NotFoundError ? new InvalidInputError(`dataset ${input.dataset} not found`) : err;
  });
}

export async function listDatasets({
  ctx,
  principal,
  input,
}: TenantCall<{ limit: number; cursor?: string | undefined }>): Promise<Page<DatasetRecord>> {
  return pageByIdDesc(input, (before, take) =>
    ctx.db
      .select()
      .from(schema.datasets)
      .where(
        and(
          eq(schema.datasets.tenantId, principal.tenantId),
          before ? lt(schema.datasets.id, before) : undefined,
        ),
      )
      .orderBy(desc(schema.datasets.id))
      .limit(take),
  );
}

/** Deletes the dataset and its files. Trainings that used it keep their results. */
export async function deleteDataset({ ctx, principal, input }: TenantCall<{ id: string }>): Promise<void> {
  const row = await getDataset({ ctx, principal, input });
  await ctx.db.delete(schema.datasets).where(eq(schema.datasets.id, row.id));
  await Promise.all(
    Object.values(row.files)
      .flat()
      .map((k) => ctx.store.delete(k)),
  );
}

/** Reads an uploaded dataset back from the store for training. */
export async function loadUploadedDataset(
  ctx: ServiceContext,
  tenantId: string,
  id: string,
): Promise<Dataset> {
  const row = await getDataset({ ctx, principal: { tenantId }, input: { id } });
  const files: Record<string, Uint8Array[]> = {};
  for (const [field, keys] of Object.entries(row.files)) {
    files[field] = [];
    for (const key of keys) {
      const chunks: Buffer[] = [];
      for await (const chunk of await ctx.store.get(key)) chunks.push(chunk as Buffer);
      files[field]?.push(new Uint8Array(Buffer.concat(chunks)));
    }
  }
  return parseUploadedDataset(row.name, row.format as UploadFormat, files);
}
