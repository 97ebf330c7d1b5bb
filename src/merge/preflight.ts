import type { Worker } from "node:worker_threads";
import { SafetensorsError, type SafetensorsProblem } from "../tensors/safetensors.js";
import { type ByteSource, readBytes, readHeaderLength } from "../tensors/source.js";
import { startThread } from "../threads.js";
import { MergeMismatchError, type MergePlan, type PlanOptions } from "./plan.js";

/** A header's bytes (without the 8-byte prefix) and the size of the file it heads. */
interface HeaderBytes {
  bytes: Uint8Array;
  size: number;
}

export interface PlanRequest {
  id: number;
  headers: HeaderBytes[];
  options: Omit<PlanOptions, "headers">;
  /** Send the plan back (a merge about to run), or only whether there is one (a request's check). */
  wantPlan: boolean;
}

export type PlanReply =
  | { id: number; plan: MergePlan | null }
  | {
      id: number;
      error:
        | { kind: "safetensors"; problem: SafetensorsProblem; message: string }
        | { kind: "mismatch"; tensor: string; message: string }
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
 * Reads the inputs' headers (ranged reads: each prefix, then each header, no data) and plans the
 * merge on a worker thread, so that parsing them - seconds for headers of tens of MB - never
 * holds the caller's event loop. The headers may hold `maxTotalHeaderBytes` together
 * (`HeadersTooLargeError` beyond, before any is read). Rejects as planning on the calling thread
 * would: `SafetensorsError`, `MergeMismatchError`.
 */
export async function planMergeOffThread(
  sources: ByteSource[],
  limits: HeaderLimits,
  options: Omit<PlanOptions, "headers">,
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
  sources: ByteSource[],
  limits: HeaderLimits,
  options: Omit<PlanOptions, "headers">,
): Promise<void> {
  await runPlan(sources, limits, options, false);
}

async function runPlan(
  sources: ByteSource[],
  limits: HeaderLimits,
  options: Omit<PlanOptions, "headers">,
  wantPlan: boolean,
): Promise<MergePlan | null> {
  const lengths = await Promise.all(sources.map((s) => readHeaderLength(s, limits.maxHeaderBytes)));
  const total = lengths.reduce((a, b) => a + b, 0);
  if (total > limits.maxTotalHeaderBytes) throw new HeadersTooLargeError(total, limits.maxTotalHeaderBytes);
  const headers = await Promise.all(
    sources.map(async (s, k) => ({ bytes: await readBytes(s, 8, lengths[k] ?? 0), size: s.size })),
  );
  const reply = await planner.run({ headers, options, wantPlan });
  if ("plan" in reply) return reply.plan;
  const { error } = reply;
  if (error.kind === "safetensors") throw new SafetensorsError(error.problem, error.message);
  if (error.kind === "mismatch") throw new MergeMismatchError(error.message, error.tensor);
  throw new Error(error.message);
}

/**
 * The process's planning thread, started at the first plan and kept (unreferenced: it never
 * holds the process open). Plans queue on it one at a time, each bounded by the header limits.
 * A thread that dies fails the plans in flight, and the next plan starts a new one.
 */
class PlanThread {
  private worker: Worker | null = null;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve(r: PlanReply): void; reject(e: Error): void }>();

  run(request: Omit<PlanRequest, "id">): Promise<PlanReply> {
    const worker = this.start();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const message: PlanRequest = { id, ...request };
      // The header bytes move to the thread rather than being copied.
      worker.postMessage(
        message,
        request.headers.map((h) => h.bytes.buffer as ArrayBuffer),
      );
    });
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const worker = startThread(import.meta.url, "plan-thread");
    worker.unref();
    worker.on("message", (reply: PlanReply) => {
      this.pending.get(reply.id)?.resolve(reply);
      this.pending.delete(reply.id);
    });
    const fail = (err: Error) => {
      if (this.worker === worker) this.worker = null;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    worker.on("error", fail);
    worker.on("exit", (code) => fail(new Error(`the merge planning thread exited with code ${code}`)));
    this.worker = worker;
    return worker;
  }
}

const planner = new PlanThread();
