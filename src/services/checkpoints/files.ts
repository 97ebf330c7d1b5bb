import { createHash } from "node:crypto";
import type { OutputShard } from "../../merge/plan.js";
import type { ObjectStore } from "../../storage/object-store.js";
import type { SafetensorsSummary } from "../../tensors/safetensors.js";
import { type ByteSource, storeSource } from "../../tensors/source.js";
import { InvalidInputError } from "../errors.js";

/** One file of a checkpoint. */
export interface CheckpointFile {
  name: string;
  sizeBytes: number;
  sha256: string;
}

/** The weights of a checkpoint in one file: the name Hugging Face's libraries look for first. */
export const WEIGHTS_FILE = "model.safetensors";
/** The index of sharded weights, in Hugging Face's layout: which shard holds each tensor. */
export const INDEX_FILE = "model.safetensors.index.json";

/** A checkpoint's files and where they are: one object, or (a key ending in `/`) under a prefix. */
export interface StoredFiles {
  storageKey: string;
  files: CheckpointFile[];
}

/** A checkpoints row's files: `files`, or the one weights file of a single-file checkpoint. */
export function storedFiles(row: {
  storageKey: string;
  files: CheckpointFile[] | null;
  sizeBytes: number;
  sha256: string;
}): StoredFiles {
  return {
    storageKey: row.storageKey,
    files: row.files ?? [{ name: WEIGHTS_FILE, sizeBytes: row.sizeBytes, sha256: row.sha256 }],
  };
}

/** Whether a storage key is a prefix its files are under (it ends in `/`), not one object. */
export function isPrefixKey(storageKey: string): boolean {
  return storageKey.endsWith("/");
}

/** The store key of one of the checkpoint's files. */
export function fileKey(c: StoredFiles, name: string): string {
  return isPrefixKey(c.storageKey) ? `${c.storageKey}${name}` : c.storageKey;
}

/** Whether the name is a weights file: `model.safetensors` or a shard. */
export function isWeightsFile(name: string): boolean {
  return name.endsWith(".safetensors");
}

/** The weights files, in order: `model.safetensors`, or the shards in name order. */
export function weightFiles(c: StoredFiles): CheckpointFile[] {
  return c.files.filter((f) => isWeightsFile(f.name)).sort((a, b) => (a.name < b.name ? -1 : 1));
}

/** Whether the weights are shards with an index, rather than one `model.safetensors`. */
export function isSharded(c: StoredFiles): boolean {
  return c.files.some((f) => f.name === INDEX_FILE);
}

/** The files that are neither weights nor their index (`config.json`, tokenizer files, ...). */
export function companionFiles(c: StoredFiles): CheckpointFile[] {
  return c.files.filter((f) => !isWeightsFile(f.name) && f.name !== INDEX_FILE);
}

/** The weights as byte sources, one per file in `weightFiles` order. */
export function weightSources(store: ObjectStore, c: StoredFiles): ByteSource[] {
  return weightFiles(c).map((f) => storeSource(store, fileKey(c, f.name), f.sizeBytes));
}

/** Refuses sharded weights: a population's members (and its start) are one safetensors file each. */
export function assertPopulationMember(row: Parameters<typeof storedFiles>[0] & { id: string }): void {
  if (isSharded(storedFiles(row))) {
    throw new InvalidInputError(
      `checkpoint ${row.id} holds sharded weights; a population's members are one safetensors file each`,
    );
  }
}

/**
 * The sha256 of a multi-file checkpoint: of its files' sha256 in `sha256sum`'s format, one line
 * per file in name order (the lines `sha256sum *` prints in a folder of its files, sorted).
 */
export function filesDigest(files: CheckpointFile[]): string {
  const lines = [...files]
    .sort((a, b) => (a.name < b.name ? -1 : 1))
    .map((f) => `${f.sha256}  ${f.name}\n`)
    .join("");
  return createHash("sha256").update(lines).digest("hex");
}

/** Removes what a storage key holds: one object, or a multi-file checkpoint's prefix. */
export async function deleteStored(store: ObjectStore, storageKey: string): Promise<void> {
  if (!isPrefixKey(storageKey)) return store.delete(storageKey);
  for (const key of await store.list(storageKey)) await store.delete(key);
}

/**
 * `model.safetensors.index.json` of shards as Hugging Face writes it: `metadata.total_size` (the
 * tensors' bytes) and `weight_map` (each tensor's shard, in name order).
 */
export function shardIndex(shards: OutputShard[]): Buffer {
  const totalSize = shards.reduce((n, s) => n + s.bytes - s.headerBytes.length, 0);
  const weightMap = shards
    .flatMap((s) => s.tensors.map((tensor) => [tensor, s.name] as const))
    .sort(([a], [b]) => (a < b ? -1 : 1));
  const index = { metadata: { total_size: totalSize }, weight_map: Object.fromEntries(weightMap) };
  return Buffer.from(`${JSON.stringify(index, null, 2)}\n`);
}

/**
 * What a multi-file checkpoint's record keeps: its weights' counts (`shards`, one summary per
 * weights file), the first one's metadata, all files' bytes and their digest (`filesDigest`).
 */
export function summaryOfFiles(shards: SafetensorsSummary[], files: CheckpointFile[]): SafetensorsSummary {
  const first = shards[0];
  if (!first) throw new Error("a checkpoint without weights");
  return {
    tensorCount: shards.reduce((n, s) => n + s.tensorCount, 0),
    parameterCount: shards.reduce((n, s) => n + s.parameterCount, 0),
    dtypes: [...new Set(shards.flatMap((s) => s.dtypes))].sort(),
    metadata: first.metadata,
    dataStart: first.dataStart,
    dataBytes: shards.reduce((n, s) => n + s.dataBytes, 0),
    sizeBytes: files.reduce((n, f) => n + f.sizeBytes, 0),
    sha256: filesDigest(files),
  };
}
