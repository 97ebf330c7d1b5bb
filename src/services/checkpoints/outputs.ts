import { createHash } from "node:crypto";
import { Readable } from "node:stream";
import type { MergePlan } from "../../merge/plan.js";
import { SafetensorsCheck, type SafetensorsSummary } from "../../tensors/safetensors.js";
import type { StoreContext } from "../context.js";
import { checkpointKey, checkpointPrefix } from "./checkpoints.js";
import {
  type CheckpointFile,
  companionFiles,
  deleteStored,
  fileKey,
  INDEX_FILE,
  isPrefixKey,
  type StoredFiles,
  shardIndex,
  summaryOfFiles,
  WEIGHTS_FILE,
} from "./files.js";
import type { NewCheckpoint } from "./registry.js";

/** A job's output being written to the store (`ObjectWriter`), its summary at `commit`. */
export interface OutputWriter {
  write(data: Uint8Array): Promise<void>;
  commit(): Promise<SafetensorsSummary>;
  abort(): Promise<void>;
}

/**
 * Starts writing a job's output to the store at the key of `id`: each write passes the same
 * strict check as uploads, and is hashed, on its way; `commit` makes the object visible once
 * the bytes made a whole valid file, and returns what the check learned (size, sha256, counts).
 */
export function createOutput(ctx: StoreContext, tenantId: string, id: string): Promise<OutputWriter> {
  return createSafetensorsWriter(ctx, checkpointKey(tenantId, id));
}

/** `createOutput` at any key. */
async function createSafetensorsWriter(ctx: StoreContext, key: string): Promise<OutputWriter> {
  const check = new SafetensorsCheck({ maxHeaderBytes: ctx.limits.maxSafetensorsHeaderBytes });
  const writer = await ctx.store.create(key);
  return {
    write: async (data) => {
      await check.update(data);
      await writer.write(data);
    },
    commit: async () => {
      const summary = check.finish();
      await writer.commit();
      return summary;
    },
    abort: () => writer.abort(),
  };
}

/** Stores a job's output held whole in memory (`createOutput` with one write). */
export async function storeOutput(
  ctx: StoreContext,
  tenantId: string,
  id: string,
  bytes: Uint8Array,
): Promise<SafetensorsSummary> {
  const output = await createOutput(ctx, tenantId, id);
  try {
    await output.write(bytes);
    return await output.commit();
  } catch (err) {
    await output.abort();
    throw err;
  }
}

/** A merge output being written, one file or several: its summary and files at `commit`. */
export interface MergeOutputWriter {
  write(data: Uint8Array): Promise<void>;
  commit(): Promise<{ summary: SafetensorsSummary; files: CheckpointFile[] | null }>;
  abort(): Promise<void>;
}

/**
 * Starts writing merge output `id` in the first input's layout: one file when the input is one
 * file stored alone (`createOutput`); otherwise files under the checkpoint's prefix: the weights as one
 * `model.safetensors` or as the plan's shards (each with its own header, each checked and
 * hashed as it is written) and their index, and the input's companion files, copied.
 */
export async function createMergeOutput(
  ctx: StoreContext,
  tenantId: string,
  id: string,
  plan: MergePlan,
  first: StoredFiles,
): Promise<MergeOutputWriter> {
  if (!isPrefixKey(first.storageKey)) {
    const output = await createOutput(ctx, tenantId, id);
    return { ...output, commit: async () => ({ summary: await output.commit(), files: null }) };
  }
  const prefix = checkpointPrefix(tenantId, id);
  const shards = plan.shards ?? [
    { name: WEIGHTS_FILE, tensors: [], headerBytes: plan.headerBytes, bytes: plan.outputBytes },
  ];
  // The engine writes one file: its header, then every tensor's bytes, which go to the shards
  // in order, each after its own header. One shard is open at a time (so memory does not grow
  // with their number); the one before is committed when the next opens.
  const summaries: SafetensorsSummary[] = [];
  let writer: OutputWriter | null = null;
  let skip = plan.headerBytes.length;
  let left = 0;
  const nextShard = async () => {
    if (writer) summaries.push(await writer.commit());
    writer = null;
    const shard = shards[summaries.length];
    if (!shard) throw new Error("the merge wrote more than its shards hold");
    writer = await createSafetensorsWriter(ctx, `${prefix}${shard.name}`);
    await writer.write(shard.headerBytes);
    left = shard.bytes - shard.headerBytes.length;
  };
  return {
    write: async (data) => {
      const skipped = Math.min(skip, data.length);
      skip -= skipped;
      let rest = data.subarray(skipped);
      while (rest.length > 0) {
        while (left === 0) await nextShard();
        const take = rest.subarray(0, left);
        await writer?.write(take);
        left -= take.length;
        rest = rest.subarray(take.length);
      }
    },
    commit: async () => {
      while (summaries.length + (writer ? 1 : 0) < shards.length) await nextShard(); // shards without data
      if (writer) summaries.push(await writer.commit());
      writer = null;
      const files: CheckpointFile[] = shards.map((s, i) => {
        const summary = summaries[i] as SafetensorsSummary;
        return { name: s.name, sizeBytes: summary.sizeBytes, sha256: summary.sha256 };
      });
      if (plan.shards) files.push(await putFile(ctx, prefix, INDEX_FILE, shardIndex(plan.shards)));
      for (const companion of companionFiles(first)) {
        await ctx.store.put(
          `${prefix}${companion.name}`,
          await ctx.store.get(fileKey(first, companion.name)),
        );
        files.push(companion);
      }
      return { summary: summaryOfFiles(summaries, files), files };
    },
    abort: async () => {
      await writer?.abort();
      await deleteStored(ctx.store, prefix);
    },
  };
}

/** Stores a small file made whole in memory under the prefix. */
async function putFile(
  ctx: StoreContext,
  prefix: string,
  name: string,
  bytes: Buffer,
): Promise<CheckpointFile> {
  await ctx.store.put(`${prefix}${name}`, Readable.from([bytes]));
  return { name, sizeBytes: bytes.length, sha256: createHash("sha256").update(bytes).digest("hex") };
}

/** The checkpoints row of an object validated into `summary` (a job output, or a completed upload session). */
export function outputRow(o: {
  id: string;
  tenantId: string;
  name: string;
  jobId: string | null;
  summary: SafetensorsSummary;
  topology?: unknown;
  /** A multi-file checkpoint's files, under its prefix. */
  files?: CheckpointFile[] | null | undefined;
}): NewCheckpoint {
  const s = o.summary;
  return {
    id: o.id,
    tenantId: o.tenantId,
    name: o.name,
    sizeBytes: s.sizeBytes,
    sha256: s.sha256,
    tensorCount: s.tensorCount,
    parameterCount: s.parameterCount,
    dtypes: s.dtypes,
    metadata: s.metadata,
    topology: o.topology ?? null,
    storageKey: o.files ? checkpointPrefix(o.tenantId, o.id) : checkpointKey(o.tenantId, o.id),
    files: o.files ?? null,
    jobId: o.jobId,
  };
}

/** Deletes a job's outputs from the store (after a failed or canceled attempt); missing ones are fine. */
export async function deleteOutputs(ctx: StoreContext, tenantId: string, ids: string[]): Promise<void> {
  await Promise.all(
    ids.flatMap((id) =>
      [checkpointKey(tenantId, id), checkpointPrefix(tenantId, id)].map((key) =>
        deleteStored(ctx.store, key).catch(() => undefined),
      ),
    ),
  );
}
