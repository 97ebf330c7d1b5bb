import { SafetensorsError, type SafetensorsProblem } from "../tensors/safetensors.js";
import { type ByteSource, readBytes, readHeaderLength } from "../tensors/source.js";
import { ThreadService } from "../threads.js";
import { MergeInputError, type MergePlan, type PlanOptions } from "./plan.js";

/** A header's bytes (without the 8-byte prefix) and the size of the file it heads. */
interface HeaderBytes {
  bytes: Uint8Array;
  size: number;
}

/**
 * A plan's options, but the headers (read from the inputs) and the output shards (the first
 * input's shards named, counted when their headers are parsed).
 */
export type PlanInput = Omit<PlanOptions, "headers" | "outputShards"> & {
  /** Shard the outputs as the first input is, with its shards' names (null: one file). */
  outputShardNames?: string[] | null | undefined;
};

export interface PlanRequest {
  /** Per input, each of its files' header (one, or its shards in order). */
  headers: HeaderBytes[][];
  options: PlanInput;
  /** Send the plan back (a merge about to run), or only whether there is one (a request's check). */
  wantPlan: boolean;
}

export type PlanReply =
  | { plan: MergePlan | null }
  | {
      error:
        | { kind: "safetensors"; problem: SafetensorsProblem; message: string }
        | { kind: "input"; tensor: string; message: string }
        | { kind: "other"; message: string };
    };

export interface HeaderLimits {
  /** Each input's header. */
  maxHeaderBytes: number;
  /** All inputs' headers together. */
  maxTotalHeaderBytes: number;
}

/** The merge's headers are more than `limitBytes` together. */
export class HeadersTooLargeError extends Error {
  constructor(
    readonly totalBytes: number,
    readonly limitBytes: number,
  ) {
    super(
      `the inputs' safetensors headers hold ${totalBytes} bytes together; a merge may read at most ${limitBytes}`,
    );
    this.name = "HeadersTooLargeError";
  }
}

/**
 * Reads the inputs' headers (ranged reads: each prefix, then each header, no data; every shard's
 * of a sharded input, seen as one file as `concatSources` reads it) and plans the
 * merge on a worker thread, so that parsing them - seconds for headers of tens of MB - never
 * holds the caller's event loop. The headers may hold `maxTotalHeaderBytes` together
 * (`HeadersTooLargeError` beyond, before any is read). Rejects as planning on the calling thread
 * would: `SafetensorsError`, `MergeInputError`.
 */
export async function planMergeOffThread(
  sources: ByteSource[][],
  limits: HeaderLimits,
  options: PlanInput,
): Promise<MergePlan> {
  const plan = await runPlan(sources, limits, options, true);
  if (!plan) throw new Error("the planning thread sent no plan");
  // Structured cloning made the Buffer a plain Uint8Array.
  const { headerBytes } = plan;
  return {
    ...plan,
    headerBytes: Buffer.from(headerBytes.buffer, headerBytes.byteOffset, headerBytes.length),
  };
}

/**
 * Checks that the inputs can be merged, as `planMergeOffThread` would plan them, without bringing
 * the plan back: a request needs only the verdict, and unpacking a plan of every tensor would
 * take its own time on the caller's thread.
 */
export async function checkMergeOffThread(
  sources: ByteSource[][],
  limits: HeaderLimits,
  options: PlanInput,
): Promise<void> {
  await runPlan(sources, limits, options, false);
}

async function runPlan(
  inputs: ByteSource[][],
  limits: HeaderLimits,
  options: PlanInput,
  wantPlan: boolean,
): Promise<MergePlan | null> {
  const lengths = await Promise.all(
    inputs.map((shards) => Promise.all(shards.map((s) => readHeaderLength(s, limits.maxHeaderBytes)))),
  );
  const total = lengths.flat().reduce((a, b) => a + b, 0);
  if (total > limits.maxTotalHeaderBytes) throw new HeadersTooLargeError(total, limits.maxTotalHeaderBytes);
  const headers = await Promise.all(
    inputs.map((shards, k) =>
      Promise.all(
        shards.map(async (s, i) => ({ bytes: await readBytes(s, 8, lengths[k]?.[i] ?? 0), size: s.size })),
      ),
    ),
  );
  // The header bytes move to the thread rather than being copied.
  const transfer = headers.flat().map((h) => h.bytes.buffer as ArrayBuffer);
  const reply = await planner.run({ headers, options, wantPlan }, transfer);
  if ("plan" in reply) return reply.plan;
  const { error } = reply;
  if (error.kind === "safetensors") throw new SafetensorsError(error.problem, error.message);
  if (error.kind === "input") throw new MergeInputError(error.message, error.tensor);
  throw new Error(error.message);
}

/** The process's planning thread: plans queue on it one at a time, each bounded by the header limits. */
const planner = new ThreadService<PlanRequest, PlanReply>(import.meta.url, "plan-thread");

/**
 * Starts the planning thread now, in a long-running process (an API server, a merge worker):
 * the first merge's POST then does not wait for the thread to load (about 140 ms of it). A
 * Lambda leaves it to its first merge, so that its cold start does not pay for it.
 */
export function warmPlanner(): void {
  planner.warm();
}
