import { availableParallelism } from "node:os";
import type { Worker } from "node:worker_threads";
import { startThread } from "../threads.js";
import { type BlockTask, mergeBlock } from "./kernel.js";

interface Pending {
  /** With the milliseconds the block took on its thread. */
  resolve(ms: number): void;
  reject(err: Error): void;
}

/**
 * Runs `mergeBlock` on worker threads, one task per worker at a time. Tasks carry views on
 * SharedArrayBuffers (see `BlockBuffers`), so nothing is copied or allocated per block. A thread
 * that dies (an error it did not catch, an exit) fails the task it held and is replaced, so the
 * pool keeps its size and no task waits on a thread that is gone. With `size` 0 blocks run on
 * the calling thread.
 */
export class MergePool {
  private readonly idle: Worker[] = [];
  private readonly waiting: { task: BlockTask; pending: Pending }[] = [];
  private readonly inFlight = new Map<Worker, Pending>();
  /** The live threads (read-only for callers: a test terminates one to see the pool recover). */
  readonly threads: Worker[] = [];
  private closing = false;
  /** The shared memory a finished merge gave back, for the next (`borrowMemory`). */
  private idleMemory: SharedArrayBuffer | null = null;

  constructor(readonly size: number = availableParallelism()) {
    for (let i = 0; i < size; i++) this.spawn();
  }

  private spawn(): void {
    const worker = startThread(import.meta.url, "worker");
    worker.unref();
    worker.on("message", (message: { ok: boolean; ms?: number; error?: string }) => {
      const pending = this.inFlight.get(worker);
      this.inFlight.delete(worker);
      if (message.ok) pending?.resolve(message.ms ?? 0);
      else pending?.reject(new Error(message.error));
      this.release(worker);
    });
    worker.on("error", (err) => this.retire(worker, err));
    worker.on("exit", (code) => this.retire(worker, new Error(`a merge thread exited (code ${code})`)));
    this.threads.push(worker);
    this.idle.push(worker);
  }

  /** A thread is gone: fail its task, forget it, start another in its place. */
  private retire(worker: Worker, err: Error): void {
    const at = this.threads.indexOf(worker);
    if (at === -1) return; // an exit after an error
    this.threads.splice(at, 1);
    const idleAt = this.idle.indexOf(worker);
    if (idleAt !== -1) this.idle.splice(idleAt, 1);
    this.inFlight.get(worker)?.reject(err);
    this.inFlight.delete(worker);
    if (this.closing) return;
    this.spawn();
    this.dispatch();
  }

  /** Merges a block; resolves with the milliseconds it took on its thread (not waiting for one). */
  run(task: BlockTask): Promise<number> {
    if (this.size === 0) {
      const started = performance.now();
      mergeBlock(task);
      return Promise.resolve(performance.now() - started);
    }
    return new Promise((resolve, reject) => {
      this.waiting.push({ task, pending: { resolve, reject } });
      this.dispatch();
    });
  }

  private release(worker: Worker): void {
    this.idle.push(worker);
    this.dispatch();
  }

  private dispatch(): void {
    while (this.idle.length > 0 && this.waiting.length > 0) {
      const worker = this.idle.pop();
      const next = this.waiting.shift();
      if (!worker || !next) return;
      this.inFlight.set(worker, next.pending);
      worker.postMessage(next.task);
    }
  }

  /**
   * Shared memory of at least `bytes` for one merge's blocks in flight: what the last merge gave
   * back when it is large enough, else new. New memory costs a page fault per 4 KiB at its first
   * touch: most of a small merge's time (4 x 13 MB: ~150 ms against ~15 ms reused). The pool
   * keeps one such region between merges: the largest given back (about `SLOT_MEMORY_BYTES`;
   * more for merges of many inputs, whose blocks `blockElementsFor` keeps at 64 Ki elements).
   */
  borrowMemory(bytes: number): SharedArrayBuffer {
    const idle = this.idleMemory;
    if (idle && idle.byteLength >= bytes) {
      this.idleMemory = null;
      return idle;
    }
    return new SharedArrayBuffer(bytes);
  }

  /** Gives back memory from `borrowMemory` that nothing uses any more. */
  returnMemory(memory: SharedArrayBuffer): void {
    if (!this.idleMemory || memory.byteLength > this.idleMemory.byteLength) this.idleMemory = memory;
  }

  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.threads.map((w) => w.terminate()));
  }
}
