import { randomUUID } from "node:crypto";
import pg from "pg";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type DatabaseHandle, openDatabase, schema } from "../src/db/client.js";
import { JobQueue } from "../src/jobs/queue.js";
import { createJsonLogger } from "../src/logger.js";
import { type DatabaseKind, emptyPostgresDatabase, POSTGRES_URL, testDatabase } from "./helpers/backends.js";

const POLICY = { retryLimit: 2, retryDelaySeconds: 60, leaseSeconds: 60 };
const logger = createJsonLogger("error", () => undefined);

/**
 * The test database, with pg-boss's queries whose text contains `slow` held back `ms` before
 * they run, and a record of when each of those settled.
 */
function withSlowQueries(database: DatabaseHandle, slow: string, ms: number) {
  const settled: string[] = [];
  const handle: DatabaseHandle = {
    ...database,
    executeSql: async (text, values) => {
      if (!text.includes(slow)) return database.executeSql(text, values);
      await new Promise((r) => setTimeout(r, ms));
      try {
        return await database.executeSql(text, values);
      } finally {
        settled.push(slow);
      }
    },
  };
  return { handle, settled };
}

async function stateOf(database: DatabaseHandle, id: string): Promise<string | undefined> {
  const { rows } = await database.executeSql("select state from pgboss.job where id = $1", [id]);
  return (rows[0] as { state: string } | undefined)?.state;
}

describe.each<DatabaseKind>(["pglite", "postgres"])("the job queue on %s, stopping", (kind) => {
  const open: { close(): Promise<void> }[] = [];
  afterEach(async () => {
    for (const r of open.splice(0).reverse()) await r.close();
  });

  async function queueOn(slow: string, ms: number, log = logger) {
    const database = await testDatabase(kind);
    open.push(database);
    const { handle, settled } = withSlowQueries(database.value, slow, ms);
    const queue = new JobQueue(handle, { policy: POLICY, maintenanceIntervalSeconds: 60 }, log);
    open.push({ close: () => queue.stop(0) });
    await queue.start();
    const id = randomUUID();
    await database.value.db.transaction((tx) => queue.enqueue(tx, "merge", id));
    return { database: database.value, queue, settled, id };
  }

  it("returns only once the finished job's completion (which pg-boss does not await) has landed", async () => {
    const { database, queue, settled, id } = await queueOn("state = 'completed'", 300);
    let ran!: () => void;
    const handled = new Promise<void>((resolve) => {
      ran = resolve;
    });
    await queue.work("merge", 1, async () => ran());
    await handled;
    await queue.stop(0);
    expect(settled).toEqual(["state = 'completed'"]);
    expect(await stateOf(database, id)).toBe("completed");
  });

  it("does not call a lease lost when its last renewal lands after the job completed", async () => {
    const lines: string[] = [];
    const { database, queue, settled, id } = await queueOn(
      "SET started_on",
      300,
      createJsonLogger("warn", (l) => lines.push(l)),
    );
    let signal!: AbortSignal;
    await queue.work("merge", 1, async (job) => {
      signal = job.signal;
    });
    // The renewal issued at the fetch is held back past the handler's return and the completion.
    while (settled.length === 0) await new Promise((r) => setTimeout(r, 20));
    await queue.stop(0);
    expect(await stateOf(database, id)).toBe("completed");
    expect(lines).toEqual([]);
    expect(signal.aborted).toBe(false);
  });

  it("fails a job fetched while it stops, for another worker to retry, without running it", async () => {
    const { database, queue, settled, id } = await queueOn("SKIP LOCKED", 300);
    const handled: string[] = [];
    await queue.work("merge", 1, async (job) => {
      handled.push(job.id);
    });
    await queue.stop(0);
    expect(settled).toContain("SKIP LOCKED");
    expect(handled).toEqual([]);
    expect(await stateOf(database, id)).toBe("retry");
  });
});

describe("the database pool", () => {
  it("survives losing an idle connection (a server restart, a failover) and reconnects", async () => {
    const empty = await emptyPostgresDatabase();
    const lines: string[] = [];
    const database = await openDatabase(
      { url: empty.value },
      createJsonLogger("warn", (l) => lines.push(l)),
    );
    try {
      await database.executeSql("select 1");
      const name = new URL(empty.value).pathname.slice(1);
      const admin = new pg.Client({ connectionString: POSTGRES_URL });
      await admin.connect();
      await admin.query("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1", [name]);
      await admin.end();
      for (let i = 0; i < 100 && lines.length === 0; i++) await new Promise((r) => setTimeout(r, 20));
      expect(lines.map((l) => JSON.parse(l).msg)).toContain("idle database connection lost");
      expect((await database.executeSql("select 2 as n")).rows).toEqual([{ n: 2 }]);
    } finally {
      await database.close();
      await empty.close();
    }
  });
});

describe("the embedded database (PGlite)", () => {
  let database: DatabaseHandle;
  beforeAll(async () => {
    database = await openDatabase({ pgliteDir: null });
  });
  afterAll(() => database.close());

  it("runs statements on its own thread: a long one leaves the event loop idle", async () => {
    const before = performance.eventLoopUtilization();
    await database.executeSql("select count(*) from generate_series(1, 3000000)");
    // On the service's thread, PGlite's WebAssembly kept the loop busy the whole statement (1.0).
    expect(performance.eventLoopUtilization(before).utilization).toBeLessThan(0.25);
  });

  it("rolls back a transaction that throws, and a database error keeps its code and constraint", async () => {
    const id = randomUUID();
    await database.db.insert(schema.tenants).values({ id, name: "t" });
    const other = randomUUID();
    const failed = await database.db
      .transaction(async (tx) => {
        await tx.insert(schema.tenants).values({ id: other, name: "u" });
        await tx.insert(schema.tenants).values({ id, name: "again" });
      })
      .catch((err: unknown) => err);
    expect((failed as Error).cause).toMatchObject({ code: "23505", constraint: "tenants_pkey" });
    const rows = await database.db.select().from(schema.tenants);
    expect(rows.map((r) => r.id)).toEqual([id]);
    await database.db.transaction(async (tx) => {
      await tx.insert(schema.tenants).values({ id: other, name: "u" });
    });
    expect(await database.db.$count(schema.tenants)).toBe(2);
  });
});

describe("closing the embedded database", () => {
  it("lets the statements in flight finish, then refuses new ones", async () => {
    const database = await openDatabase({ pgliteDir: null });
    const count = "select count(*)::int as n from generate_series(1, 1000000)";
    const inFlight = [
      database.executeSql(count),
      database.executeSql("select 2 as n"),
      database.executeSql(count),
    ];
    const closed = database.close();
    const late = database.executeSql("select 1").catch((err: Error) => err.message);
    await closed;
    expect((await Promise.all(inFlight)).map((r) => r.rows)).toEqual([
      [{ n: 1000000 }],
      [{ n: 2 }],
      [{ n: 1000000 }],
    ]);
    expect(await late).toBe("the embedded database is closed");
    await expect(database.executeSql("select 1")).rejects.toThrow("the embedded database is closed");
  });
});
