import { createHash } from "node:crypto";
import { type Readable, Transform, type TransformCallback } from "node:stream";
import { newId } from "../../ids.js";
import { type SafetensorsSummary, SafetensorsValidator } from "../../tensors/safetensors.js";
import { readSafetensorsHeader, storeSource } from "../../tensors/source.js";
import { type Json, JsonSyntaxError, parseStrictJson } from "../../tensors/strict-json.js";
import type { ServiceContext, TenantCall } from "../context.js";
import { InvalidInputError, PayloadTooLargeError } from "../errors.js";
import { pipeUpload } from "../upload-stream.js";
import {
  asUploadError,
  type Checkpoint,
  checkpointPrefix,
  getCheckpoint,
  refuseDeclaredSize,
} from "./checkpoints.js";
import {
  type CheckpointFile,
  deleteStored,
  INDEX_FILE,
  isWeightsFile,
  summaryOfFiles,
  WEIGHTS_FILE,
} from "./files.js";
import { outputRow } from "./outputs.js";
import { insertCheckpoints } from "./registry.js";

/** One file of a multi-file upload, as it arrives. */
export interface UploadedFile {
  name: string;
  body: Readable;
}

/** At most this many files in one checkpoint. */
export const MAX_CHECKPOINT_FILES = 256;
/** Each file that is not weights (`config.json`, tokenizer files, the index) at most this large. */
export const MAX_COMPANION_BYTES = 64 * 1024 * 1024;
/** A file name: letters, digits, `.`, `_`, `-`, not starting with `.` or `-`, no folders. */
const FILE_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

/**
 * Uploads a checkpoint of several files, streamed one after another into the object store:
 * weights as `model.safetensors`, or as shards with `model.safetensors.index.json` in Hugging
 * Face's layout, and companion files (`config.json`, tokenizer files, ...). Every weights file is
 * validated and hashed as it streams, like a single upload; the index must name exactly the
 * shards' tensors, each in the shard that holds it. On any failure nothing remains.
 */
export async function createMultiFileCheckpoint({
  ctx,
  principal,
  input,
}: TenantCall<{
  name: string;
  files: AsyncIterable<UploadedFile>;
  declaredBytes?: number | undefined;
}>): Promise<Checkpoint> {
  // A multipart body frames each file with its boundary and headers: a few hundred bytes.
  refuseDeclaredSize(input.declaredBytes, ctx.limits.maxUploadBytes, MAX_CHECKPOINT_FILES * 1024);
  const id = newId();
  const prefix = checkpointPrefix(principal.tenantId, id);
  try {
    const files: CheckpointFile[] = [];
    const weights = new Map<string, SafetensorsSummary>();
    let index: Buffer | null = null;
    let total = 0;
    for await (const file of input.files) {
      checkFileName(file.name, files);
      const left = ctx.limits.maxUploadBytes - total;
      const key = `${prefix}${file.name}`;
      if (isWeightsFile(file.name)) {
        const validator = new SafetensorsValidator({
          maxHeaderBytes: ctx.limits.maxSafetensorsHeaderBytes,
          maxBytes: left,
        });
        await storeValidated(ctx, file, validator, ctx.store.put(key, validator));
        const summary = validator.summary();
        weights.set(file.name, summary);
        files.push({ name: file.name, sizeBytes: summary.sizeBytes, sha256: summary.sha256 });
      } else {
        const isIndex = file.name === INDEX_FILE;
        // The index is read once stored, so it is held: no larger than a safetensors header.
        const cap = isIndex ? ctx.limits.maxSafetensorsHeaderBytes : MAX_COMPANION_BYTES;
        const counter = new CountingHash(Math.min(left, cap), isIndex);
        await storeValidated(ctx, file, counter, ctx.store.put(key, counter));
        if (isIndex) index = Buffer.concat(counter.kept);
        files.push({ name: file.name, sizeBytes: counter.bytes, sha256: counter.digest() });
      }
      total += files.at(-1)?.sizeBytes ?? 0;
    }
    const shards = await checkLayout(ctx, prefix, weights, index);
    const summary = summaryOfFiles(
      shards.map((name) => weights.get(name) as SafetensorsSummary),
      files,
    );
    const [row] = await ctx.db.transaction((tx) =>
      insertCheckpoints(tx, [
        outputRow({ id, tenantId: principal.tenantId, name: input.name, jobId: null, summary, files }),
      ]),
    );
    if (!row) throw new Error("checkpoint insert returned no row");
  } catch (err) {
    await deleteStored(ctx.store, prefix);
    throw err;
  }
  return getCheckpoint({ ctx, principal, input: { id } });
}

function checkFileName(name: string, before: CheckpointFile[]): void {
  if (!FILE_NAME.test(name) || name.includes("..")) {
    throw new InvalidInputError(
      `file name ${JSON.stringify(name)} is not allowed: letters, digits, '.', '_' and '-', at most 128, no folders`,
    );
  }
  if (before.some((f) => f.name === name)) throw new InvalidInputError(`file ${name} was sent twice`);
  if (before.length >= MAX_CHECKPOINT_FILES) {
    throw new PayloadTooLargeError(`a checkpoint holds at most ${MAX_CHECKPOINT_FILES} files`, {
      limit_files: MAX_CHECKPOINT_FILES,
    });
  }
}

/**
 * Pipes a file through `check` into the store (`stored`); what fails is an upload error (as for
 * a single file) that names the file.
 */
async function storeValidated(
  ctx: ServiceContext,
  file: UploadedFile,
  check: Transform,
  stored: Promise<unknown>,
): Promise<void> {
  const [piped, put] = await Promise.allSettled([pipeUpload(file.body, check), stored]);
  const failed = [piped, put].find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (!failed) return;
  const err = asUploadError(failed.reason, ctx.limits.maxUploadBytes, ctx.limits.maxSafetensorsHeaderBytes);
  if (err instanceof Error) err.message = `${file.name}: ${err.message}`;
  throw err;
}

/** Counts and hashes a file that is not weights on its way (and keeps it, if asked), refusing it past `limit` bytes. */
class CountingHash extends Transform {
  bytes = 0;
  readonly kept: Buffer[] = [];
  private readonly hash = createHash("sha256");

  constructor(
    private readonly limit: number,
    private readonly keep: boolean,
  ) {
    super();
  }

  digest(): string {
    return this.hash.digest("hex");
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.bytes > this.limit) {
      const message = `the file is larger than the limit of ${this.limit} bytes`;
      callback(new PayloadTooLargeError(message, { limit_bytes: this.limit }));
      return;
    }
    this.hash.update(chunk);
    if (this.keep) this.kept.push(chunk);
    callback(null, chunk);
  }
}

/**
 * The weights' files in order, after checking the layout: `model.safetensors` alone, or shards
 * and an index whose `weight_map` names each shard's tensors exactly (so none is in two shards,
 * and none is missing).
 */
async function checkLayout(
  ctx: ServiceContext,
  prefix: string,
  weights: Map<string, SafetensorsSummary>,
  index: Buffer | null,
): Promise<string[]> {
  const names = [...weights.keys()].sort();
  if (index === null) {
    if (names.length === 1 && names[0] === WEIGHTS_FILE) return names;
    throw new InvalidInputError(
      names.length === 0
        ? `no weights: send ${WEIGHTS_FILE}, or shards with ${INDEX_FILE}`
        : `weights in several files (${names.join(", ")}) need ${INDEX_FILE}, naming each tensor's shard; one file is named ${WEIGHTS_FILE}`,
    );
  }
  if (weights.has(WEIGHTS_FILE)) {
    throw new InvalidInputError(
      `${WEIGHTS_FILE} is the name of unsharded weights: shards listed in ${INDEX_FILE} take other names`,
    );
  }
  const weightMap = parseIndex(index);
  const byShard = new Map<string, Set<string>>();
  for (const [tensor, shard] of weightMap) {
    if (!weights.has(shard)) {
      throw new InvalidInputError(
        `${INDEX_FILE} puts tensor ${JSON.stringify(tensor)} in ${shard}, which was not sent`,
      );
    }
    byShard.set(shard, (byShard.get(shard) ?? new Set()).add(tensor));
  }
  for (const name of names) {
    const listed = byShard.get(name);
    if (!listed) throw new InvalidInputError(`${name} is not a shard ${INDEX_FILE} names`);
    const header = await readSafetensorsHeader(
      storeSource(ctx.store, `${prefix}${name}`, (weights.get(name) as SafetensorsSummary).sizeBytes),
      ctx.limits.maxSafetensorsHeaderBytes,
    );
    for (const t of header.tensors) {
      if (!listed.delete(t.name)) {
        const elsewhere = weightMap.get(t.name);
        throw new InvalidInputError(
          elsewhere === undefined
            ? `tensor ${JSON.stringify(t.name)} of ${name} is not in ${INDEX_FILE}`
            : `tensor ${JSON.stringify(t.name)} is in ${name}, but ${INDEX_FILE} puts it in ${elsewhere}`,
          { tensor: t.name },
        );
      }
    }
    const [missing] = listed;
    if (missing !== undefined) {
      throw new InvalidInputError(
        `${INDEX_FILE} puts tensor ${JSON.stringify(missing)} in ${name}, which does not hold it`,
        {
          tensor: missing,
        },
      );
    }
  }
  return names;
}

/** The `weight_map` of an index: tensor name to shard file. Duplicate keys are refused. */
function parseIndex(bytes: Buffer): Map<string, string> {
  let root: Json;
  try {
    root = parseStrictJson(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (err) {
    const why = err instanceof JsonSyntaxError ? err.message : "it is not UTF-8";
    throw new InvalidInputError(`${INDEX_FILE} is not valid JSON: ${why}`);
  }
  const weightMap = root instanceof Map ? root.get("weight_map") : undefined;
  if (!(weightMap instanceof Map) || weightMap.size === 0) {
    throw new InvalidInputError(`${INDEX_FILE} needs a "weight_map" object from tensor names to shard files`);
  }
  const map = new Map<string, string>();
  for (const [tensor, shard] of weightMap) {
    if (typeof shard !== "string") {
      throw new InvalidInputError(
        `${INDEX_FILE}: the shard of tensor ${JSON.stringify(tensor)} is not a file name`,
      );
    }
    map.set(tensor, shard);
  }
  return map;
}
