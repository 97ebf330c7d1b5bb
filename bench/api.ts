/**
 * Reads through the API under load (issue 16): the compiled service (`node dist/server.js`, its
 * in-process worker on) on a fresh PGlite data dir and on a fresh database on DATABASE_URL's
 * Postgres, filesystem store, seeded through the API with CHECKPOINTS small uploaded checkpoints
 * and one finished merge job. Then autocannon (50 connections, DURATION seconds each, after a
 * 2 s warm-up) asks, with one API key:
 *   /healthz first (no database, no key: the server's own ceiling), then
 *   GET /v1/checkpoints?limit=50, GET /v1/checkpoints/{id} and GET /v1/jobs/{id}. Prints requests/s, p50, p99 and non-2xx
 * answers per URL. The API serves a checkpoint's body or a page again while the tenant's
 * checkpoints have not changed; the list once more, each request a search never asked before
 * (a new cursor, the same rows), shows a page made anew. The key's rate limit is raised out of
 * the way (it is still counted).
 * On Postgres, the list once more after giving every checkpoint the TF.js topology of a
 * ResNet-20 (37 KB of JSON), as the checkpoints a training makes have: a listing shows only
 * whether a checkpoint has one.
 * Targets: 2,000 requests/s on Postgres and 500 on PGlite, p99 under 100 ms.
 *
 * usage: npm run bench:api [-- DURATION [CHECKPOINTS]]   (default 10 s, 200 checkpoints)
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import "@tensorflow/tfjs";
import autocannon from "autocannon";
import pg from "pg";
import { modelToSafetensors } from "../src/ml/export.js";
import { buildModel } from "../src/ml/models.js";
import { encodeSafetensorsHeader } from "../src/tensors/safetensors.js";
import { BENCH_KEY, freshDatabase, startService } from "./server.js";

const duration = Number(process.argv[2] ?? 10);
const checkpoints = Number(process.argv[3] ?? 200);
const auth = { Authorization: `Bearer ${BENCH_KEY}` };

/** A 1 KiB safetensors file, different for each seed. */
function checkpointBytes(seed: number): Buffer {
  const { bytes } = encodeSafetensorsHeader([{ name: "w", dtype: "F32", shape: [256] }], null);
  return Buffer.concat([bytes, Buffer.from(new Float32Array(256).fill(seed).buffer)]);
}

async function call<T>(base: string, path: string, init: RequestInit = {}): Promise<T> {
  const res = await fetch(`${base}${path}`, { ...init, headers: { ...auth, ...init.headers } });
  if (!res.ok) throw new Error(`${init.method ?? "GET"} ${path}: ${res.status} ${await res.text()}`);
  return (await res.json()) as T;
}

/** Uploads the checkpoints and merges the first four; the ids to ask for. */
async function seed(base: string): Promise<{ checkpointId: string; jobId: string }> {
  const ids: string[] = [];
  for (let i = 0; i < checkpoints; i++) {
    const { id } = await call<{ id: string }>(base, `/v1/checkpoints?name=bench-${i}`, {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: checkpointBytes(i),
    });
    ids.push(id);
  }
  const job = await call<{ id: string }>(base, "/v1/merges", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ method: "papa-all", inputs: ids.slice(0, 4) }),
  });
  let status = "queued";
  while (status !== "succeeded") {
    ({ status } = await call<{ status: string }>(base, `/v1/jobs/${job.id}`));
    if (status === "failed") throw new Error("the seed merge failed");
    await new Promise((r) => setTimeout(r, 50));
  }
  return { checkpointId: ids[0] ?? "", jobId: job.id };
}

/** The TF.js topology a ResNet-20 trained here would have. */
function resnetTopology(): string {
  const model = buildModel({ kind: "resnet20" }, [32, 32, 3], 10, 1);
  return JSON.stringify(modelToSafetensors(model, {}).topology);
}

/**
 * Loads `url`; with `fresh`, each request asks for `url` with a cursor never asked before (after
 * an id above every id: the same first page), so that no answer kept for an earlier one serves it.
 */
async function load(url: string, headers: Record<string, string>, seconds: number, fresh = false) {
  let n = 0;
  const cursor = () =>
    Buffer.from(JSON.stringify(`ffffffff-ffff-ffff-ffff-${(n++).toString(16).padStart(12, "0")}`)).toString(
      "base64url",
    );
  const { pathname, search } = new URL(url);
  const requests = fresh
    ? [
        {
          setupRequest: (req: autocannon.Request) => ({
            ...req,
            path: `${pathname}${search}&cursor=${cursor()}`,
          }),
        },
      ]
    : undefined;
  return autocannon({ url, connections: 50, duration: seconds, headers, requests });
}

async function measure(db: "pglite" | "postgres"): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "papa-bench-api-"));
  const database = db === "postgres" ? await freshDatabase() : null;
  const service = await startService(dir, {
    PAPA_RATE_LIMIT_PER_KEY_PER_MINUTE: "100000000",
    ...(database ? { DATABASE_URL: database.url } : {}),
  });
  try {
    const base = service.url;
    const { checkpointId, jobId } = await seed(base);
    const targets: [string, string, Record<string, string>][] = [
      ["/healthz", `${base}/healthz`, {}],
      ["/v1/checkpoints?limit=50", `${base}/v1/checkpoints?limit=50`, auth],
      ["/v1/checkpoints/{id}", `${base}/v1/checkpoints/${checkpointId}`, auth],
      ["/v1/jobs/{id}", `${base}/v1/jobs/${jobId}`, auth],
    ];
    const measureUrl = async (label: string, url: string, headers: Record<string, string>, fresh = false) => {
      await load(url, headers, 2, fresh);
      const r = await load(url, headers, duration, fresh);
      console.log(
        `api db=${db} url=${label} rps=${r.requests.average.toFixed(0)} p50_ms=${r.latency.p50} p99_ms=${r.latency.p99} non2xx=${r.non2xx} errors=${r.errors}`,
      );
    };
    for (const [label, url, headers] of targets) await measureUrl(label, url, headers);
    await measureUrl(
      "/v1/checkpoints?limit=50 (a new search each time)",
      `${base}/v1/checkpoints?limit=50`,
      auth,
      true,
    );
    if (database) {
      const client = new pg.Client({ connectionString: database.url });
      await client.connect();
      await client.query("update checkpoints set topology = $1", [resnetTopology()]);
      await client.end();
      await measureUrl(
        "/v1/checkpoints?limit=50 (ResNet-20 topologies)",
        `${base}/v1/checkpoints?limit=50`,
        auth,
      );
    }
  } finally {
    await service.stop();
    await database?.drop();
    await rm(dir, { recursive: true, force: true });
  }
}

for (const db of ["postgres", "pglite"] as const) await measure(db);
