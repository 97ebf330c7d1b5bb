import type { Worker } from "node:worker_threads";
import { Worker as WorkerThread } from "node:worker_threads";

/**
 * A worker thread running the module beside `base` named `name` (without extension): the
 * compiled `.js`, or from TypeScript sources (tests, `npm run papa`) the `.ts` loaded through
 * tsx, since on Node 20 a worker does not honour `--import` loaders in `execArgv` (tsx found
 * from here: an eval'd module resolves packages from the working directory, which may be any).
 */
export function startThread(base: string, name: string): Worker {
  if (!base.endsWith(".ts")) return new WorkerThread(new URL(`./${name}.js`, base));
  const url = JSON.stringify(new URL(`./${name}.ts`, base).href);
  const tsx = JSON.stringify(import.meta.resolve("tsx/esm/api"));
  return new WorkerThread(`import(${tsx}).then((tsx) => tsx.tsImport(${url}, ${url}));`, {
    eval: true,
  });
}

/**
 * A long-lived worker thread that answers requests one at a time, in order: each message it is
 * sent carries an `id`, and each reply carries the same. Started at the first request and
 * unreferenced (it never holds the process open). A thread that dies fails the requests in
 * flight, and the next request starts a new one.
 */
export class ThreadService<Request, Reply> {
  private worker: Worker | null = null;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve(r: Reply): void; reject(e: Error): void }>();

  constructor(
    private readonly base: string,
    private readonly name: string,
  ) {}

  /** Starts the thread ahead of its first request, which then does not wait for it to load. */
  warm(): void {
    this.start();
  }

  /** Sends `request`; the buffers in `transfer` move to the thread rather than being copied. */
  run(request: Request, transfer: ArrayBuffer[] = []): Promise<Reply> {
    const worker = this.start();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ id, request }, transfer);
    });
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const worker = startThread(this.base, this.name);
    worker.unref();
    worker.on("message", ({ id, reply }: { id: number; reply: Reply }) => {
      this.pending.get(id)?.resolve(reply);
      this.pending.delete(id);
    });
    const fail = (err: Error) => {
      if (this.worker === worker) this.worker = null;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    worker.on("error", fail);
    worker.on("exit", (code) => fail(new Error(`the ${this.name} thread exited with code ${code}`)));
    this.worker = worker;
    return worker;
  }
}

/** A thread's side of `ThreadService`: answers each request with `handle`'s reply. */
export function serveThread<Request, Reply>(
  port: {
    on(event: "message", listener: (m: { id: number; request: Request }) => void): void;
    postMessage(m: unknown): void;
  } | null,
  handle: (request: Request) => Reply,
): void {
  port?.on("message", ({ id, request }) => port.postMessage({ id, reply: handle(request) }));
}
