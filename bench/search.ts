/**
 * Checkpoint search at scale (issue 15): a fresh database holding ROWS checkpoints of one tenant
 * and as many of another (1,000 models each; ten tags on a tenth of the rows each and one tag
 * on ten rows; a test accuracy for every checkpoint; a pull chain of lineage; jobs of 4 outputs), then
 * each search of `GET /v1/checkpoints` as the service runs it (`listCheckpoints`, its prepared
 * query, 50 a page): the median of RUNS runs, and the plan the database chose for it (EXPLAIN
 * ANALYZE). On this machine's Postgres and on PGlite.
 *
 * usage: npm run bench:search [-- ROWS [DATABASES [RUNS]]]   (default 1000000 postgres,pglite 20)
 */
import type { PGlite } from "@electric-sql/pglite";
import { drizzle as drizzlePg } from "drizzle-orm/node-postgres";
import { drizzle as drizzlePglite } from "drizzle-orm/pglite";
import pg from "pg";
import { type Database, openDatabase, schema } from "../src/db/client.js";
import { type CheckpointSearch, listCheckpoints } from "../src/services/checkpoints/checkpoints.js";
import type { ServiceContext } from "../src/services/context.js";
import { emptyPostgresDatabase } from "../test/helpers/backends.js";
import { median } from "./stats.js";

const rows = Number(process.argv[2] ?? 1_000_000);
const databases = (process.argv[3] ?? "postgres,pglite").split(",");
const runs = Number(process.argv[4] ?? 20);

const TENANT = "00000000-0000-7000-8000-00000000000a";
const OTHER = "00000000-0000-7000-8000-00000000000b";
/** A time-ordered id for row `i` of a tenant (`t`: a or b): what newId makes, in order. */
const idSql = (i: string, t: string) =>
  `(substr(lpad(to_hex(${i}), 12, '0'), 1, 8) || '-' || substr(lpad(to_hex(${i}), 12, '0'), 9, 4) || '-7000-8000-00000000000${t}')::uuid`;
const idOf = (i: number, t: string) => {
  const h = i.toString(16).padStart(12, "0");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-7000-8000-00000000000${t}`;
};

/** The seed, in statements that need no parameters (both drivers run them as they are). */
function seedSql(tenant: string, t: string): string[] {
  const n = `generate_series(1, ${rows}) i`;
  return [
    `insert into tenants (id, name) values ('${tenant}', '${t}')`,
    `insert into jobs (id, tenant_id, kind, status, params)
       select ${idSql("i", t)}, '${tenant}', 'merge', 'succeeded', '{}' from generate_series(1, ${Math.floor(rows / 4)}) i where i % 250 = 0`,
    `insert into checkpoints (id, tenant_id, name, version, tags, size_bytes, sha256, tensor_count, parameter_count, dtypes, storage_key, job_id)
       select ${idSql("i", t)}, '${tenant}', 'model-' || (i % 1000), i / 1000 + 1,
         case when i % 100000 = 7 then array['tag-' || (i % 10), 'rare'] else array['tag-' || (i % 10)] end,
         8, repeat('0', 64), 1, 1, array['F32'], 'nowhere/' || i,
         case when i % 1000 < 4 and (i / 4) % 250 = 0 and i / 4 > 0 then ${idSql("i / 4", t)} end
       from ${n}`,
    `insert into checkpoint_tags (tenant_id, tag, checkpoint_id)
       select '${tenant}', unnest(tags), id from checkpoints where tenant_id = '${tenant}'`,
    `insert into models (tenant_id, name, latest_version)
       select '${tenant}', 'model-' || m, max(i / 1000 + 1) from ${n}, lateral (select i % 1000 as m) x group by m`,
    `insert into metrics (id, tenant_id, checkpoint_id, dataset, split, name, value)
       select gen_random_uuid(), '${tenant}', ${idSql("i", t)}, 'mnist', 'test', 'accuracy', random() from ${n}`,
    `insert into lineage_edges (parent_id, child_id, coefficient, method)
       select ${idSql("i - 1", t)}, ${idSql("i", t)}, 0.5, 'papa-pull' from generate_series(2, ${rows}) i`,
  ];
}

const accuracy = { dataset: "mnist", split: "test", name: "accuracy" };
const searches: [string, Omit<CheckpointSearch, "limit" | "sort"> & { sort?: CheckpointSearch["sort"] }][] = [
  ["newest first", {}],
  ["one model's versions (name)", { name: "model-7" }],
  ["name prefix model-12 (11 models)", { namePrefix: "model-12" }],
  ["a tag on 10 % of rows", { tags: ["tag-3"] }],
  ["a rare tag", { tags: ["rare"] }],
  ["two tags", { tags: ["tag-7", "rare"] }],
  ["a job's outputs", { jobId: idOf(1000, "a") }],
  ["children of a parent", { parentId: idOf(rows / 2, "a") }],
  ["best test accuracy first", { metric: accuracy, sort: "-metric" }],
  [
    "accuracy in [0.5, 0.501], best first",
    { metric: { ...accuracy, min: 0.5, max: 0.501 }, sort: "-metric" },
  ],
  ["a tag, best accuracy first", { tags: ["tag-3"], metric: accuracy, sort: "-metric" }],
];

interface Explaining {
  db: Database;
  /** The SQL and parameters of the last query `db` ran. */
  last(): { query: string; params: unknown[] };
  explain(query: string, params: unknown[]): Promise<string[]>;
  close(): Promise<void>;
}

async function open(kind: string): Promise<Explaining> {
  let last = { query: "", params: [] as unknown[] };
  const logger = { logQuery: (query: string, params: unknown[]) => (last = { query, params }) };
  const seed = async (run: (text: string) => Promise<unknown>) => {
    for (const [tenant, t] of [
      [TENANT, "a"],
      [OTHER, "b"],
    ] as const) {
      for (const statement of seedSql(tenant, t)) await run(statement);
    }
    await run("analyze");
  };
  if (kind === "postgres") {
    const empty = await emptyPostgresDatabase();
    await (await openDatabase({ url: empty.value })).close();
    const pool = new pg.Pool({ connectionString: empty.value, max: 2 });
    await seed((text) => pool.query(text));
    return {
      db: drizzlePg({ client: pool, schema, logger }),
      last: () => last,
      explain: async (query, params) =>
        (await pool.query(`explain (analyze, costs off) ${query}`, params)).rows.map((r) => r["QUERY PLAN"]),
      close: async () => {
        await pool.end();
        await empty.close();
      },
    };
  }
  const handle = await openDatabase({ pgliteDir: null });
  await seed((text) => handle.executeSql(text));
  return {
    db: drizzlePglite({ client: (handle.db as unknown as { $client: PGlite }).$client, schema, logger }),
    last: () => last,
    explain: async (query, params) =>
      (await handle.executeSql(`explain (analyze, costs off) ${query}`, params)).rows.map(
        (r) => (r as Record<string, string>)["QUERY PLAN"] ?? "",
      ),
    close: () => handle.close(),
  };
}

for (const kind of databases) {
  const started = performance.now();
  const db = await open(kind);
  console.log(
    `search db=${kind} rows=${rows} per tenant, seeded in ${((performance.now() - started) / 1000).toFixed(0)} s`,
  );
  const ctx = { db: db.db } as ServiceContext;
  const principal = { tenantId: TENANT };
  try {
    for (const [label, search] of searches) {
      const input = { limit: 50, sort: "-created_at" as const, ...search };
      const times: number[] = [];
      let found = 0;
      for (let i = 0; i < runs; i++) {
        const t0 = performance.now();
        found = (await listCheckpoints({ ctx, principal, input })).items.length;
        times.push(performance.now() - t0);
      }
      const { query, params } = db.last();
      console.log(
        `search db=${kind} query="${label}" rows=${found} p50_ms=${median(times).toFixed(1)} max_ms=${Math.max(...times).toFixed(1)}`,
      );
      // The plan of the page's own rows; the parents' and metrics' subqueries run per row found.
      for (const line of await db.explain(query, params)) console.log(`    ${line}`);
    }
  } finally {
    await db.close();
  }
}
