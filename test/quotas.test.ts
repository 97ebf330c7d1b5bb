import { request as httpRequest } from "node:http";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { createApp } from "../src/app.js";
import { openDatabase } from "../src/db/client.js";
import { startWorker } from "../src/jobs/worker.js";
import { assembleRuntime } from "../src/runtime.js";
import type { DatabaseKind } from "./helpers/backends.js";
import { countSelects, type Harness, listen, startHarness, TEST_WORKER, upload } from "./helpers/harness.js";
import { type JobBody, postMerge, waitForJob } from "./helpers/jobs.js";
import { smallCheckpoint } from "./helpers/safetensors.js";

async function twoInputs(h: Harness, key: string): Promise<string[]> {
  const ids = [];
  for (const k of [1, 2]) {
    const res = await upload(h, smallCheckpoint(k), `m${k}`, { key });
    ids.push(((await res.json()) as { id: string }).id);
  }
  return ids;
}

describe.each<DatabaseKind>(["pglite", "postgres"])("job quotas and fairness on %s", (db) => {
  let h: Harness;
  beforeEach(async () => {
    h = await startHarness(db, "filesystem", {
      limits: { maxQueuedJobsPerTenant: 5, maxRunningJobsPerTenant: 1 },
    });
  });
  afterEach(() => h.close());

  const mergeAs = async (key: string, body: object) =>
    h.request("/v1/merges", {
      method: "POST",
      key,
      body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" },
    });

  it("refuses a tenant's jobs past its queue (429, Retry-After) without touching another tenant's", async () => {
    const a = await twoInputs(h, h.keyA);
    const b = await twoInputs(h, h.keyB);
    const answers = [];
    for (let seed = 0; seed < 7; seed++)
      answers.push(await mergeAs(h.keyA, { method: "papa-2", inputs: a, seed }));
    expect(answers.map((r) => r.status)).toEqual([202, 202, 202, 202, 202, 429, 429]);
    const refused = answers[5] as Response;
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(((await refused.json()) as { limit: number }).limit).toBe(5);
    expect((await mergeAs(h.keyB, { method: "papa-all", inputs: b })).status).toBe(202);
    // As its jobs finish, the tenant's queue has room again.
    await startWorker(h.ctx, TEST_WORKER);
    const first = ((await (answers[0] as Response).json()) as JobBody).id;
    await waitForJob(h, first, 60_000);
    expect((await mergeAs(h.keyA, { method: "papa-2", inputs: a, seed: 9 })).status).toBe(202);
  });

  it("does not let one tenant's backlog starve another's job", async () => {
    const a = await twoInputs(h, h.keyA);
    const b = await twoInputs(h, h.keyB);
    const backlog = [];
    for (let seed = 0; seed < 4; seed++) {
      backlog.push(
        ((await (await mergeAs(h.keyA, { method: "papa-2", inputs: a, seed })).json()) as JobBody).id,
      );
    }
    const bId = ((await (await mergeAs(h.keyB, { method: "papa-all", inputs: b })).json()) as JobBody).id;
    // One worker, one job at a time: B's job is second in line, not behind A's whole backlog.
    await startWorker(h.ctx, { ...TEST_WORKER, queues: ["merge"], mergeConcurrency: 1 });
    const startsOfA = [];
    for (const id of backlog) {
      const job = (await waitForJob(h, id, 60_000)) as JobBody & { started_at: string };
      startsOfA.push(Date.parse(job.started_at));
    }
    const bJob = (await (await h.request(`/v1/jobs/${bId}`, { key: h.keyB })).json()) as JobBody & {
      started_at: string;
    };
    expect(bJob.status).toBe("succeeded");
    startsOfA.sort();
    expect(Date.parse(bJob.started_at)).toBeLessThan(startsOfA[2] ?? 0);
  });
});

/** Another API instance on the harness's Postgres database and store. */
async function secondInstance(h: Harness) {
  const database = await openDatabase({ url: h.databaseUrl ?? "" });
  const runtime = await assembleRuntime({
    database,
    store: h.ctx.store,
    config: {
      limits: h.ctx.limits,
      presignExpiresSeconds: 900,
      worker: TEST_WORKER,
      datasets: h.ctx.datasets,
    },
    logger: h.ctx.logger,
  });
  return {
    app: createApp(runtime.ctx),
    close: async () => {
      await runtime.close();
      await database.close();
    },
  };
}

describe("request rate limits", () => {
  it("holds a key to its rate across two API instances on one Postgres", async () => {
    const h = await startHarness("postgres", "filesystem", { limits: { requestsPerKeyPerMinute: 6 } });
    const second = await secondInstance(h);
    const apps = [h.app, second.app];
    try {
      const statuses = [];
      for (let i = 0; i < 8; i++) {
        const app = apps[i % 2] as typeof h.app;
        const res = await app.request("/v1/checkpoints", { headers: { Authorization: `Bearer ${h.keyA}` } });
        statuses.push(res.status);
      }
      expect(statuses).toEqual([200, 200, 200, 200, 200, 200, 429, 429]);
      // Another key has its own budget.
      expect(
        (await apps[1]?.request("/v1/checkpoints", { headers: { Authorization: `Bearer ${h.keyB}` } }))
          ?.status,
      ).toBe(200);
    } finally {
      await second.close();
      await h.close();
    }
  });

  it("counts a key's concurrent requests one by one: exactly its rate passes", async () => {
    const h = await startHarness("postgres", "filesystem", { limits: { requestsPerKeyPerMinute: 7 } });
    try {
      const statuses = await Promise.all(
        Array.from({ length: 12 }, async () => (await h.request("/v1/checkpoints")).status),
      );
      expect(statuses.filter((s) => s === 200)).toHaveLength(7);
      expect(statuses.filter((s) => s === 429)).toHaveLength(5);
      expect((await h.request("/v1/checkpoints")).status).toBe(429);
    } finally {
      await h.close();
    }
  });

  it("refuses a key revoked on another instance within a second", async () => {
    const h = await startHarness("postgres", "filesystem");
    const second = await secondInstance(h);
    const other = second.app;
    try {
      const created = await h.request("/v1/api-keys", { method: "POST" });
      const { id, key } = (await created.json()) as { id: string; key: string };
      const ask = () => other.request("/v1/checkpoints", { headers: { Authorization: `Bearer ${key}` } });
      expect((await ask()).status).toBe(200);
      expect((await h.request(`/v1/api-keys/${id}`, { method: "DELETE" })).status).toBe(204);
      await new Promise((r) => setTimeout(r, 1100));
      expect((await ask()).status).toBe(401);
    } finally {
      await second.close();
      await h.close();
    }
  });

  it("shuts out an address that tries wrong keys, not the others", async () => {
    const h = await startHarness("pglite", "filesystem", { limits: { authFailuresPerMinute: 5 } });
    const server = await listen(h);
    try {
      const from = (localAddress: string, key: string) =>
        new Promise<number>((resolve, reject) => {
          const req = httpRequest(`${server.base}/v1/checkpoints`, {
            localAddress,
            headers: { Authorization: `Bearer ${key}` },
          });
          req.on("response", (res) => {
            res.resume();
            resolve(res.statusCode ?? 0);
          });
          req.on("error", reject);
          req.end();
        });
      const wrong = "papa_wrong-key-wrong-key-wrong-key-wrong-key-012";
      const statuses = [];
      for (let i = 0; i < 7; i++) statuses.push(await from("127.0.0.3", wrong));
      expect(statuses).toEqual([401, 401, 401, 401, 401, 429, 429]);
      // Shut out: even a right key from there waits; from elsewhere it works.
      expect(await from("127.0.0.3", h.keyA)).toBe(429);
      expect(await from("127.0.0.4", h.keyA)).toBe(200);
    } finally {
      await server.close();
      await h.close();
    }
  });
});

describe("event streams", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem", { limits: { maxEventStreamsPerTenant: 60 } });
  });
  afterAll(() => h.close());

  it("read each followed job once per poll, however many streams follow it; a tenant's streams are capped", async () => {
    const inputs = await twoInputs(h, h.keyA);
    const { id } = (await (await postMerge(h, { method: "papa-all", inputs })).json()) as JobBody;
    const selects = countSelects(h);
    const streams = await Promise.all(Array.from({ length: 60 }, () => h.request(`/v1/jobs/${id}/events`)));
    expect(streams.map((s) => s.status)).toEqual(Array(60).fill(200));
    const over = await h.request(`/v1/jobs/${id}/events`);
    expect(over.status).toBe(429);
    expect((await h.request(`/v1/jobs/${id}/events`, { key: h.keyB })).status).toBe(404);
    const opened = selects.count();
    await new Promise((r) => setTimeout(r, 2000));
    // A poll every 250 ms: about 8 reads in 2 s for all 60 streams (one stream polling alone did 8).
    expect(selects.count() - opened).toBeLessThan(16);
    expect(selects.count() - opened).toBeGreaterThan(2);
    selects.stop();

    // A change reaches every stream; then the streams end and free the tenant's slots.
    await startWorker(h.ctx, TEST_WORKER);
    const texts = await Promise.all(streams.map((s) => s.text()));
    for (const text of texts) expect(text).toContain('"status":"succeeded"');
    for (let i = 0; i < 50 && (await h.request(`/v1/jobs/${id}/events`)).status === 429; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const again = await h.request(`/v1/jobs/${id}/events`);
    expect(again.status).toBe(200);
    expect(await again.text()).toContain('"status":"succeeded"');
  });
});
