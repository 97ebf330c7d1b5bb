import type { Readable } from "node:stream";
import busboy from "busboy";
import { and, desc, eq, lt } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import {
  DatasetError,
  DatasetFileCheck,
  DatasetTooLargeError,
  describeUpload,
  type FileSummary,
  NATURAL_IMAGES,
  parseUploadedDataset,
  UPLOAD_FIELDS,
  type UploadBudget,
  type UploadFormat,
} from "../../ml/dataset-formats.js";
import {
  BUILT_IN_DATASETS,
  BUILT_IN_DESCRIPTIONS,
  type BuiltInDataset,
  type Dataset,
  type DatasetDescription,
  type LoadOptions,
  limitDataset,
  loadBuiltInDataset,
} from "../../ml/datasets.js";
import type { ObjectStore } from "../../storage/object-store.js";
import type { TenantCall } from "../context.js";
import { InvalidInputError, NotFoundError, PayloadTooLargeError } from "../errors.js";
import { type Page, pageByIdDesc } from "../pagination.js";
import { pipeUpload } from "../upload-stream.js";

export type DatasetRecord = typeof schema.datasets.$inferSelect;

/** Most files one dataset upload may hold (CIFAR-10 ships as six). */
const MAX_DATASET_FILES = 64;

/** One file of an upload, as it is stored. */
interface StoredFile {
  field: string;
  key: string;
  check: DatasetFileCheck;
  done: Promise<unknown>;
}

/**
 * Registers an uploaded dataset (`multipart/form-data`): each file streams to the object store as
 * uploaded while its content is checked completely (shapes, counts, labels; gzip accepted), in
 * constant memory. The files, and their gunzipped content, may hold `limits.maxDatasetBytes`
 * together (413). A rejected upload leaves nothing behind.
 */
export async function createDataset({
  ctx,
  principal,
  input,
}: TenantCall<{
  name: string;
  format: UploadFormat;
  /** The request's Content-Type, with the multipart boundary. */
  contentType: string;
  body: Readable;
}>): Promise<DatasetRecord> {
  const { format } = input;
  const id = newId();
  const limitBytes = ctx.limits.maxDatasetBytes;
  const budget: UploadBudget = { fileBytes: limitBytes, contentBytes: limitBytes, limitBytes };
  const files: StoredFile[] = [];
  try {
    await new Promise<void>((resolve, reject) => {
      let parser: busboy.Busboy;
      try {
        parser = busboy({
          headers: { "content-type": input.contentType },
          limits: { files: MAX_DATASET_FILES, fields: 16, parts: MAX_DATASET_FILES + 16 },
        });
      } catch (err) {
        return reject(new DatasetError((err as Error).message));
      }
      parser.on("file", (field, stream) => {
        if (!UPLOAD_FIELDS[format].includes(field)) {
          stream.resume();
          return reject(
            new DatasetError(
              `${format} takes the file fields ${UPLOAD_FIELDS[format].join(", ")}, not ${field}`,
            ),
          );
        }
        const key = `tenants/${principal.tenantId}/datasets/${id}/${field}-${files.filter((f) => f.field === field).length}`;
        const check = new DatasetFileCheck(format, budget);
        // Listened to from the start: the store may attach its own listeners only after an await.
        check.on("error", reject);
        stream.on("error", (err) => check.destroy(err));
        const done = ctx.store.put(key, stream.pipe(check));
        done.catch(reject);
        files.push({ field, key, check, done });
      });
      parser.on("filesLimit", () =>
        reject(new DatasetError(`a dataset has at most ${MAX_DATASET_FILES} files`)),
      );
      parser.on("error", (err) =>
        reject(new DatasetError(`not a valid multipart body: ${(err as Error).message}`)),
      );
      parser.on("close", () => Promise.all(files.map((f) => f.done)).then(() => resolve(), reject));
      pipeUpload(input.body, parser).catch(reject);
    });
    const summaries: Record<string, FileSummary[]> = {};
    const keys: Record<string, string[]> = {};
    for (const f of files) {
      summaries[f.field] = [...(summaries[f.field] ?? []), f.check.summary()];
      keys[f.field] = [...(keys[f.field] ?? []), f.key];
    }
    const described = describeUpload(format, summaries);
    const [row] = await ctx.db
      .insert(schema.datasets)
      .values({
        id,
        tenantId: principal.tenantId,
        name: input.name,
        format,
        shape: described.shape,
        classes: described.classes,
        trainCount: described.trainCount,
        testCount: described.testCount,
        sizeBytes: limitBytes - budget.fileBytes,
        files: keys,
      })
      .returning();
    if (!row) throw new Error("dataset insert returned no row");
    return row;
  } catch (err) {
    // Every file's write has settled (a failed one removed its own) before the rest go.
    await Promise.allSettled(files.map((f) => f.done));
    await Promise.all(files.map((f) => ctx.store.delete(f.key).catch(() => undefined)));
    if (err instanceof DatasetTooLargeError) {
      throw new PayloadTooLargeError(err.message, { limit_bytes: err.limitBytes });
    }
    if (err instanceof DatasetError)
      throw new InvalidInputError(`not a valid ${format} dataset: ${err.message}`);
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
 * What a dataset a job names holds (shape, classes, counts), checked when the job is submitted:
 * a built-in dataset, or one the tenant uploaded (another tenant's is as unknown as a missing
 * one). 422 otherwise.
 */
export async function describeDatasetRef({
  ctx,
  principal,
  input,
}: TenantCall<{ dataset: string }>): Promise<DatasetDescription> {
  if ((BUILT_IN_DATASETS as readonly string[]).includes(input.dataset)) {
    const name = input.dataset as BuiltInDataset;
    if (!ctx.datasets.includes(name)) {
      throw new InvalidInputError(
        `dataset ${name} is not installed on this service (it offers ${ctx.datasets.join(", ")}; ` +
          "an operator installs Fashion-MNIST with Debian's dataset-fashion-mnist or PAPA_FASHION_MNIST_DIR, " +
          "and lists what the workers have in PAPA_DATASETS)",
      );
    }
    return BUILT_IN_DESCRIPTIONS[name];
  }
  const row = await getDataset({ ctx, principal, input: { id: input.dataset } }).catch((err: unknown) => {
    throw err instanceof NotFoundError ? new InvalidInputError(`dataset ${input.dataset} not found`) : err;
  });
  return {
    shape: row.shape,
    classes: row.classes,
    trainCount: row.trainCount,
    testCount: row.testCount,
    natural: NATURAL_IMAGES[row.format as UploadFormat],
  };
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

/**
 * Where a job's data comes from, resolved where the database is (`datasetSource`) and loaded
 * wherever the job runs (`loadDataset`): a built-in dataset, or an upload's files in the store.
 */
export type DatasetSource =
  | { builtIn: BuiltInDataset }
  | { uploaded: Pick<DatasetRecord, "name" | "format" | "files"> };

/** The source of a dataset a job names: built-in, or uploaded by the tenant (404 otherwise). */
export async function datasetSource({
  ctx,
  principal,
  input,
}: TenantCall<{ dataset: string }>): Promise<DatasetSource> {
  if ((BUILT_IN_DATASETS as readonly string[]).includes(input.dataset)) {
    return { builtIn: input.dataset as BuiltInDataset };
  }
  const { name, format, files } = await getDataset({ ctx, principal, input: { id: input.dataset } });
  return { uploaded: { name, format, files } };
}

/** Loads a dataset from its source, cut to the requested subsets. */
export async function loadDataset(
  store: ObjectStore,
  source: DatasetSource,
  options: LoadOptions,
): Promise<Dataset> {
  if ("builtIn" in source) return loadBuiltInDataset(source.builtIn, options);
  const { name, format, files: keys } = source.uploaded;
  const files: Record<string, Uint8Array[]> = {};
  for (const [field, list] of Object.entries(keys)) {
    files[field] = [];
    for (const key of list) {
      const chunks: Buffer[] = [];
      for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
      files[field]?.push(new Uint8Array(Buffer.concat(chunks)));
    }
  }
  return limitDataset(parseUploadedDataset(name, format as UploadFormat, files), options);
}
