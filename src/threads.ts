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

/** A thread's failure as it crosses back: its message and its primitive fields (`code`, `detail`...). */
export interface ThreadError {
  name: string;
  message: string;
  fields: Record<string, unknown>;
}

type ThreadReply<Reply> = { id: number; reply: Reply } | { id: number; error: ThreadError };

/**
 * The calling side of a thread served by `serveThread`: each request carries an `id`, and the
 * reply with that id resolves it, or rejects it with the thread's error (its fields kept). The
 * thread holds the process open only while a call is in flight. When it dies, the calls in
 * flight and every later one fail with its error (`exitError` names an exit).
 */
export class ThreadCalls<Request, Reply> {
  private nextId = 0;
  private readonly pending = new Map<number, { resolve(r: Reply): void; reject(e: Error): void }>();
  private idleWaiters: (() => void)[] = [];
  /** Why the thread is gone; null while it runs. */
  failure: Error | null = null;

  constructor(
    readonly worker: Worker,
    exitError: (code: number) => Error,
  ) {
    worker.unref();
    worker.on("message", (message: ThreadReply<Reply>) => {
      const call = this.pending.get(message.id);
      this.pending.delete(message.id);
      if ("error" in message) {
        const { name, message: text, fields } = message.error;
        call?.reject(Object.assign(new Error(text), fields, { name }));
      } else {
        call?.resolve(message.reply);
      }
      this.settled();
    });
    const fail = (err: Error) => {
      this.failure ??= err;
      for (const call of this.pending.values()) call.reject(this.failure);
      this.pending.clear();
      this.settled();
    };
    worker.on("error", fail);
    worker.on("exit", (code) => fail(exitError(code)));
  }

  /** Sends `request`; the buffers in `transfer` move to the thread rather than being copied. */
  call(request: Request, transfer: ArrayBuffer[] = []): Promise<Reply> {
    if (this.failure) return Promise.reject(this.failure);
    const id = this.nextId++;
    // Held open while a call is in flight: a caller awaiting the thread keeps the process alive.
    this.worker.ref();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, request }, transfer);
    });
  }

  /** Resolves once no call is in flight. */
  idle(): Promise<void> {
    if (this.pending.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private settled(): void {
    if (this.pending.size > 0) return;
    this.worker.unref();
    for (const resolve of this.idleWaiters) resolve();
    this.idleWaiters = [];
  }
}

/**
 * A long-lived worker thread that answers requests in order, started at the first request. A
 * thread that dies fails the requests in flight, and the next request starts a new one.
 */
export class ThreadService<Request, Reply> {
  private calls: ThreadCalls<Request, Reply> | null = null;

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
    return this.start().call(request, transfer);
  }

  private start(): ThreadCalls<Request, Reply> {
    if (this.calls && !this.calls.failure) return this.calls;
    const worker = startThread(this.base, this.name);
    this.calls = new ThreadCalls(
      worker,
      (code) => new Error(`the ${this.name} thread exited with code ${code}`),
    );
    return this.calls;
  }
}

/**
 * A thread's side of `ThreadCalls`: answers each request with `handle`'s reply, or, when it
 * throws or rejects, with the error. Requests that `handle` answers at once are answered in order.
 */
export function serveThread<Request, Reply>(
  port: {
    on(event: "message", listener: (m: { id: number; request: Request }) => void): void;
    postMessage(m: ThreadReply<Reply>): void;
  } | null,
  handle: (request: Request) => Reply | Promise<Reply>,
): void {
  port?.on("message", ({ id, request }) => {
    new Promise<Reply>((resolve) => resolve(handle(request))).then(
      (reply) => port.postMessage({ id, reply }),
      (err: unknown) => port.postMessage({ id, error: threadError(err) }),
    );
  });
}

function threadError(err: unknown): ThreadError {
  if (!(err instanceof Error)) return { name: "Error", message: String(err), fields: {} };
  const fields = Object.fromEntries(
    Object.entries(err).filter(([, value]) => ["string", "number", "boolean"].includes(typeof value)),
  );
  return { name: err.name, message: err.message, fields };
}
