import { type ChildProcess, fork } from "node:child_process";
import type { Limits } from "../config.js";
import type { LogLevel } from "../logger.js";
import type { StoreContext } from "../services/context.js";
import type { StoreLocation } from "../storage/object-store.js";

/**
 * Work for TensorFlow.js, which runs in a process of its own (`tfjs-child.ts`): each task gets a
 * fresh process with its own TF.js instance and memory, so that a crash, an out-of-memory or an
 * abort ends that task alone, and the caller's event loop never waits on a training step.
 */
export type TfjsTask =
  | { kind: "probe" }
  | { kind: "train"; input: unknown }
  | { kind: "evaluate-merge"; input: unknown };

/** How a worker runs TF.js: the backend it forces (PAPA_BACKEND), where Fashion-MNIST is. */
export type TfjsOptions = Pick<TfjsEnvironment, "backend" | "fashionMnistDir">;

/** What a task is given to report with. */
export interface TaskHooks {
  signal: AbortSignal;
  progress(fraction: number, detail?: Record<string, number>): void;
  /** Asks the parent (its `onRequest`) and resolves with its answer: work that needs the database. */
  request(body: unknown): Promise<unknown>;
}

/** The environment of a task run for `ctx`'s store, limits and log level. */
export function tfjsEnvironment(ctx: StoreContext, options: TfjsOptions): TfjsEnvironment {
  // Only what the child needs: the caller's options may hold more (a merge worker's threads).
  return {
    backend: options.backend,
    fashionMnistDir: options.fashionMnistDir,
    store: ctx.store.location,
    limits: ctx.limits,
    logLevel: ctx.logger.level,
  };
}

/** What the child needs besides its task: the store, the limits, how to log. */
export interface TfjsEnvironment {
  store: StoreLocation;
  limits: Limits;
  logLevel: LogLevel;
  backend: "tensorflow" | "wasm" | "cpu" | undefined;
  fashionMnistDir: string;
}

/** Why a task failed, as it crosses between the processes. */
export interface TaskFailure {
  name: string;
  message: string;
  permanent: boolean;
}

export type ParentMessage =
  | { type: "run"; task: TfjsTask; environment: TfjsEnvironment }
  | { type: "abort" }
  | { type: "response"; id: number; body?: unknown; error?: TaskFailure };

export type ChildMessage =
  | { type: "progress"; fraction: number; detail?: Record<string, number> }
  | { type: "request"; id: number; body: unknown }
  | { type: "done"; result: unknown }
  | { type: "failed"; error: TaskFailure };

/** A task that failed in its process; `permanent` when no retry can mend it (the child's verdict). */
export class TfjsTaskError extends Error {
  constructor(
    message: string,
    readonly permanent: boolean,
  ) {
    super(message);
    this.name = "TfjsTaskError";
  }
}

/** How long an aborted task's process gets to stop before it is killed. */
const ABORT_GRACE_MS = 10_000;

/**
 * Runs `task` in a new process and resolves with its result. Progress comes through `onProgress`,
 * the child's requests through `onRequest` (a rejection reaches the child as an error whose
 * `permanent` is the thrown error's, or else false);
 * `signal` aborts the task (the process is asked to stop, and killed if it does not). A process
 * that exits without an answer (a crash, killed for memory) fails the task, retryably.
 */
export function runTfjsTask<T>(
  task: TfjsTask,
  environment: TfjsEnvironment,
  hooks: {
    signal?: AbortSignal | undefined;
    onProgress?: (fraction: number, detail?: Record<string, number>) => void;
    onStart?: (pid: number) => void;
    onRequest?: (body: unknown) => Promise<unknown>;
  } = {},
): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const child = startChild();
    let settled = false;
    const settle = (outcome: () => void) => {
      if (settled) return;
      settled = true;
      hooks.signal?.removeEventListener("abort", onAbort);
      outcome();
    };
    const onAbort = () => {
      child.send({ type: "abort" } satisfies ParentMessage, () => undefined);
      setTimeout(() => child.kill("SIGKILL"), ABORT_GRACE_MS).unref();
    };
    if (hooks.signal?.aborted) {
      child.kill("SIGKILL");
      reject(hooks.signal.reason);
      return;
    }
    hooks.signal?.addEventListener("abort", onAbort);
    if (child.pid !== undefined) hooks.onStart?.(child.pid);
    child.on("message", (message: ChildMessage) => {
      if (message.type === "progress") hooks.onProgress?.(message.fraction, message.detail);
      else if (message.type === "request") answer(child, message, hooks.onRequest);
      else if (message.type === "done") settle(() => resolve(message.result as T));
      else {
        const { error } = message;
        const aborted = hooks.signal?.aborted;
        settle(() =>
          reject(aborted ? hooks.signal?.reason : new TfjsTaskError(error.message, error.permanent)),
        );
      }
    });
    child.on("error", (err) => settle(() => reject(err)));
    child.on("exit", (code, signal) =>
      settle(() =>
        reject(
          hooks.signal?.aborted
            ? hooks.signal.reason
            : new TfjsTaskError(
                `the ${task.kind} process exited (${signal ? `signal ${signal}` : `code ${code}`}) without an answer`,
                false,
              ),
        ),
      ),
    );
    child.send({ type: "run", task, environment } satisfies ParentMessage);
  });
}

/** Answers one of the child's requests with `handler`'s result or failure. */
function answer(
  child: ChildProcess,
  { id, body }: { id: number; body: unknown },
  handler: ((body: unknown) => Promise<unknown>) | undefined,
): void {
  const reply = (message: ParentMessage) => {
    if (child.connected) child.send(message, () => undefined);
  };
  (handler ?? (() => Promise.reject(new Error("this task's requests have no handler"))))(body).then(
    (result) => reply({ type: "response", id, body: result }),
    (err: Error & { permanent?: boolean }) =>
      reply({
        type: "response",
        id,
        error: { name: err.name, message: err.message, permanent: err.permanent === true },
      }),
  );
}

/**
 * The child's entry: the compiled `.js`, or from TypeScript sources (tests, `npm run papa`) the
 * `.ts` through tsx. Its output and errors go where this process's go.
 */
function startChild(): ChildProcess {
  const fromSources = import.meta.url.endsWith(".ts");
  const entry = new URL(`./tfjs-child.${fromSources ? "ts" : "js"}`, import.meta.url);
  return fork(entry, [], {
    execArgv: fromSources ? ["--import", "tsx"] : [],
    serialization: "advanced",
    stdio: ["ignore", "inherit", "inherit", "ipc"],
  });
}
