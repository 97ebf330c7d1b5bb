import { mkdir } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import type { PGlite } from "@electric-sql/pglite";
import { drizzle as drizzlePg } from "drizzle-orm/node-postgres";
import { migrate as migratePg } from "drizzle-orm/node-postgres/migrator";
import type { PgDatabase, PgQueryResultHKT } from "drizzle-orm/pg-core";
import pg from "pg";
import type { Logger } from "../logger.js";
import * as schema from "./schema.js";

export { schema };

/** The one database type services use: node-postgres and PGlite both satisfy it. */
export type Database = PgDatabase<PgQueryResultHKT, typeof schema>;

export interface DatabaseHandle {
  db: Database;
  kind: "postgres" | "pglite";
  /**
   * Raw SQL with positional parameters, for libraries that bring their own SQL (pg-boss).
   * Without parameters the text may hold several statements.
   */
  executeSql(text: string, values?: unknown[]): Promise<{ rows: unknown[] }>;
  close(): Promise<void>;
}

const migrationsFolder = fileURLToPath(new URL("../../drizzle", import.meta.url));
/** Serialises migrations when several processes start at once on one Postgres. */
const MIGRATION_LOCK = 7_243_911;

export type DatabaseTarget = { url: string } | { pgliteDir: string | null };

/**
 * Opens the database and applies pending migrations: node-postgres for a `postgres://` URL,
 * PGlite otherwise (in `pgliteDir`, or in memory when it is null).
 */
export async function openDatabase(target: DatabaseTarget, logger?: Logger): Promise<DatabaseHandle> {
  if ("url" in target) {
    const pool = new pg.Pool({ connectionString: target.url, max: 10 });
    // An idle connection that breaks (server restart, failover) is dropped from the pool, and the
    // next query opens a new one; unlistened, the error would crash the process.
    pool.on("error", (err) => logger?.warn("idle database connection lost", { error: err }));
    const client = await pool.connect();
    try {
      await client.query("select pg_advisory_lock($1)", [MIGRATION_LOCK]);
      await migratePg(drizzlePg({ client }), { migrationsFolder });
    } finally {
      await client.query("select pg_advisory_unlock($1)", [MIGRATION_LOCK]).catch(() => undefined);
      client.release();
    }
    const db: Database = drizzlePg({ client: pool, schema });
    return {
      db,
      kind: "postgres",
      executeSql: (text, values = []) => pool.query(text, values),
      close: () => pool.end(),
    };
  }
  if (target.pgliteDir) await mkdir(target.pgliteDir, { recursive: true });
  // Loaded only here: a service on Postgres (a Lambda's cold start) does without PGlite's import.
  const [{ PgliteThread }, { drizzle: drizzlePglite }] = await Promise.all([
    import("./pglite.js"),
    import("drizzle-orm/pglite"),
  ]);
  const client = await PgliteThread.open(target.pgliteDir, migrationsFolder);
  // drizzle calls `query` and `transaction` of its client, and `query` of a transaction.
  const db: Database = drizzlePglite({ client: client as unknown as PGlite, schema });
  return {
    db,
    kind: "pglite",
    // PGlite's extended protocol takes one statement; `exec` takes many but no parameters.
    executeSql: async (text, values = []) =>
      values.length > 0 ? client.query(text, values) : { rows: (await client.exec(text)).at(-1)?.rows ?? [] },
    close: () => client.close(),
  };
}

/**
 * A query built once per database and prepared there (a named statement on each Postgres
 * connection), run with its placeholders' values: hot reads skip drizzle's query building and
 * Postgres's parsing.
 */
export function preparedQuery<Q>(build: (db: Database) => Q): (db: Database) => Q {
  const byDatabase = new WeakMap<Database, Q>();
  return (db) => {
    let query = byDatabase.get(db);
    if (query === undefined) {
      query = build(db);
      byDatabase.set(db, query);
    }
    return query;
  };
}
