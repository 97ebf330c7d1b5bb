import { setTimeout as sleep } from "node:timers/promises";
import { startThread, ThreadCalls } from "../threads.js";

/** How long closing waits for the calls in flight. */
const CLOSE_WAIT_MS = 5000;

/** A request to the embedded database's thread (`pglite-thread.ts`). */
export type PgliteRequest =
  | { op: "open"; dataDir: string | null; migrationsFolder: string }
  | {
      op: "query";
      text: string;
      params: unknown[];
      rowMode: "array" | "object" | undefined;
      /** Types whose values stay text (the caller's parsers that keep the text). */
      textTypes: number[];
      tx: number | undefined;
    }
  | { op: "exec"; text: string; tx: number | undefined }
  | { op: "begin" }
  | { op: "end"; tx: number; commit: boolean }
  | { op: "close" };

interface Results {
  rows: unknown[];
  fields: { name: string; dataTypeID: number }[];
  affectedRows?: number;
}

interface QueryOptions {
  rowMode?: "array" | "object";
  parsers?: Record<number, (text: string, typeId: number) => unknown>;
}

/** What drizzle's PGlite driver and pg-boss call on a PGlite or on one of its transactions. */
export interface PgliteCalls {
  query(text: string, params?: unknown[], options?: QueryOptions): Promise<Results>;
  exec(text: string): Promise<Results[]>;
}

/**
 * PGlite (the embedded Postgres) in a thread of its own, behind the calls the service makes of
 * it: PGlite runs each statement synchronously in its WebAssembly, and on the service's thread a
 * page of rows held the event loop for milliseconds at a time, every request behind it waiting.
 * Here the statements run beside the event loop, on another core. A thread that dies fails every
 * call in flight and every later one (the database is gone; /readyz says so).
 */
export class PgliteThread implements PgliteCalls {
  private closing = false;
  private readonly calls = new ThreadCalls<PgliteRequest, unknown>(
    startThread(import.meta.url, "pglite-thread"),
    (code) =>
      new Error(
        this.closing
          ? "the embedded database is closed"
          : `the embedded database's thread exited (code ${code})`,
      ),
  );

  private constructor() {}

  /** Opens PGlite in `dataDir` (in memory when null) on a new thread and applies the migrations. */
  static async open(dataDir: string | null, migrationsFolder: string): Promise<PgliteThread> {
    const thread = new PgliteThread();
    try {
      await thread.call({ op: "open", dataDir, migrationsFolder });
    } catch (err) {
      await thread.calls.worker.terminate();
      throw err;
    }
    return thread;
  }

  async query(
    text: string,
    params: unknown[] = [],
    options: QueryOptions = {},
    tx?: number,
  ): Promise<Results> {
    const textTypes = Object.entries(options.parsers ?? {}).map(([oid, parse]) => {
      if (parse("text", Number(oid)) !== "text") {
        throw new Error(`a parser of type ${oid} that changes the value cannot run in the database's thread`);
      }
      return Number(oid);
    });
    const request = { op: "query" as const, text, params, rowMode: options.rowMode, textTypes, tx };
    return (await this.call(request)) as Results;
  }

  exec(text: string, tx?: number): Promise<Results[]> {
    return this.call({ op: "exec", text, tx }) as Promise<Results[]>;
  }

  /**
   * Runs `callback` in a transaction (PGlite's: other statements wait until it ends), committed
   * when the callback resolves and rolled back when it throws.
   */
  async transaction<T>(callback: (tx: PgliteCalls) => Promise<T>): Promise<T> {
    const tx = (await this.call({ op: "begin" })) as number;
    let result: T;
    try {
      result = await callback({
        query: (text, params, options) => this.query(text, params, options, tx),
        exec: (text) => this.exec(text, tx),
      });
    } catch (err) {
      await this.call({ op: "end", tx, commit: false });
      throw err;
    }
    await this.call({ op: "end", tx, commit: true });
    return result;
  }

  /**
   * Lets the calls in flight finish (for up to CLOSE_WAIT_MS) and open transactions end, refusing
   * new ones as a closed PGlite does, then closes PGlite and ends the thread.
   */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.race([this.calls.idle(), sleep(CLOSE_WAIT_MS, undefined, { ref: false })]);
    try {
      if (!this.calls.failure) await this.call({ op: "close" });
    } finally {
      await this.calls.worker.terminate();
    }
  }

  private call(request: PgliteRequest): Promise<unknown> {
    // Statements of a transaction already open may still run (and end it) while closing.
    const ofOpenTransaction = "tx" in request && request.tx !== undefined;
    if (this.closing && request.op !== "close" && !ofOpenTransaction && !this.calls.failure) {
      return Promise.reject(new Error("the embedded database is closed"));
    }
    return this.calls.call(request);
  }
}
