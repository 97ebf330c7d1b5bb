import { parentPort } from "node:worker_threads";
import { PGlite, type Transaction } from "@electric-sql/pglite";
import { drizzle } from "drizzle-orm/pglite";
import { migrate } from "drizzle-orm/pglite/migrator";
import { serveThread } from "../threads.js";
import type { PgliteRequest } from "./pglite.js";

/**
 * The embedded database's thread (see `pglite.ts`): PGlite runs every statement synchronously in
 * its WebAssembly, so here it holds this thread, not the service's event loop. Each request is
 * PGlite's own call (`query`, `exec`, `transaction`), with PGlite's own queueing of concurrent
 * ones; requests are answered as they finish, by id.
 */
let database: PGlite | null = null;

/** Open transactions, by id: the callback PGlite runs holds until the service ends it. */
const transactions = new Map<
  number,
  { tx: Transaction | null; end(commit: boolean): void; done: Promise<void> }
>();
let nextTransaction = 0;

function open(): PGlite {
  if (!database) throw new Error("the embedded database is not open");
  return database;
}

/** Where a statement runs: inside transaction `id`, or on its own. */
function target(id: number | undefined): PGlite | Transaction {
  if (id === undefined) return open();
  const tx = transactions.get(id)?.tx;
  if (!tx) throw new Error(`transaction ${id} is not open`);
  return tx;
}

/** Opens a transaction; resolves with its id once PGlite has begun it (queued behind others). */
function begin(): Promise<number> {
  const id = nextTransaction++;
  let end!: (commit: boolean) => void;
  const ended = new Promise<boolean>((resolve) => {
    end = resolve;
  });
  return new Promise((begun, failed) => {
    const done = open().transaction(async (tx) => {
      const entry = transactions.get(id);
      if (entry) entry.tx = tx;
      begun(id);
      if (!(await ended)) await tx.rollback();
    });
    transactions.set(id, { tx: null, end, done });
    done.catch((err: unknown) => {
      transactions.delete(id);
      failed(err);
    });
  });
}

async function handle(request: PgliteRequest): Promise<unknown> {
  switch (request.op) {
    case "open":
      database = new PGlite(request.dataDir ?? "memory://");
      await migrate(drizzle({ client: database }), { migrationsFolder: request.migrationsFolder });
      return null;
    case "query": {
      // The only parsers that cross: those that keep a type's text (drizzle's, for dates).
      const keepText = Object.fromEntries(request.textTypes.map((oid) => [oid, (text: string) => text]));
      return target(request.tx).query(request.text, request.params, {
        rowMode: request.rowMode,
        parsers: keepText,
      });
    }
    case "exec":
      return target(request.tx).exec(request.text);
    case "begin":
      return begin();
    case "end": {
      const entry = transactions.get(request.tx);
      if (!entry) throw new Error(`transaction ${request.tx} is not open`);
      transactions.delete(request.tx);
      entry.end(request.commit);
      await entry.done;
      return null;
    }
    case "close":
      await database?.close();
      database = null;
      return null;
  }
}

serveThread(parentPort, handle);
