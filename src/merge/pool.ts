import { availableParallelism } from "node:os";
import type { Worker } from "node:worker_threads";
import { startThread } from "../threads.js";
import { type BlockTask, mergeBlock } from "./kernel.js";

interface Pending {
  resolve(): void;
  reject(err: Error): void;
}

/**
 * Runs `mergeBlock` on worker threads, one task per worker at a time. Tasks carry views on
 * SharedArrayBuffers (see `BlockBuffers`), so nothing is copied or allocated per block.
 * With `size` 0 blocks run on the calling thread.
 */
export class MergePool {
  private readonly idle: Worker[] = [];
  private readonly waiting: { task: BlockTask; pending: Pending }[] = [];
  private readonly inFlight = new Map<Worker, Pending>();
  private readonly workers: Worker[] = [];

  constructor(readonly size: number = availableParallelism()) {
    for (let i = 0; i < size; i++) {
      const worker = startThread(import.meta.url, "worker");
      worker.unref();
      worker.on("message", (message: { ok: boolean; error?: string }) => {
        const pending = this.inFlight.get(worker);
        this.inFlight.delete(worker);
        if (message.ok) pending?.resolve();
        else pending?.reject(new Error(message.error));
        this.release(worker);
      });
      worker.on("error", (err) => {
        this.inFlight.get(worker)?.reject(err);
        this.inFlight.delete(worker);
      });
      this.workers.push(worker);
      this.idle.push(worker);
    }
  }

  run(task: BlockTask): Promise<void> {
    if (this.size === 0) return Promise.resolve(mergeBlock(task));
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

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
