import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdir, mkdtemp, readdir, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { eq, inArray, sql } from "drizzle-orm";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { schema } from "../src/db/client.js";
import { derivedId } from "../src/ids.js";
import { startWorker } from "../src/jobs/worker.js";
import { checkpointKey, createCheckpoint } from "../src/services/checkpoints/checkpoints.js";
import { type Harness, startHarness, TEST_WORKER } from "./helpers/harness.js";
import { type JobBody, postMerge, waitForJob } from "./helpers/jobs.js";
import { buildSafetensors, f32 } from "./helpers/safetensors.js";

/** Merges the test can catch midway: 4 inputs of 8M float32 parameters (32 MB each). */
const BIG_PARAMS = 8 * 1024 * 1024;

function bigMember(k: number): Buffer {
  const values = new Float32Array(BIG_PARAMS);
  for (let i = 0; i < values.length; i++) values[i] = ((i % 977) - 488) / 64 + k;
  return buildSafetensors([
    { name: "w", dtype: "F32", shape: [BIG_PARAMS], data: new Uint8Array(values.buffer) },
  ]);
}

/** `npm run start:worker` as a deployment runs it, on the test's Postgres database and store. */
async function spawnWorker(
  h: Harness,
  dataDir: string,
  /** Added to the worker's environment; undefined removes a variable. */
  env: Record<string, string | undefined> = {},
): Promise<ChildProcess & { output(): string }> {
  const settings: Record<string, string | undefined> = {
    PATH: process.env.PATH ?? "",
    DATABASE_URL: h.databaseUrl ?? "",
    PAPA_DATA_DIR: dataDir,
    PAPA_WORKER_QUEUES: "merge",
    PAPA_JOB_LEASE_SECONDS: "4",
    PAPA_QUEUE_MAINTENANCE_SECONDS: "1",
    PAPA_JOB_RETRY_DELAY_SECONDS: "1",
    PAPA_JOB_RETRY_LIMIT: "3",
    PAPA_MERGE_THREADS: "1",
    PAPA_MERGE_CONCURRENCY: "4",
    PAPA_MAX_UPLOAD_BYTES: String(1 << 30),
    ...env,
  };
  const child = spawn(process.execPath, ["--import", "tsx", "src/worker.ts"], {
    env: Object.fromEntries(Object.entries(settings).filter(([, v]) => v !== undefined)),
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stderr?.resume();
  await new Promise<void>((resolve, reject) => {
    child.stdout?.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes('"msg":"worker started"')) resolve();
    });
    child.on("exit", (code) => reject(new Error(`worker exited with ${code}`)));
  });
  return Object.assign(child, { output: () => out });
}

describe("merge workers as separate processes", () => {
  let h: Harness;
  let dataDir: string;
  const workers: ChildProcess[] = [];

  const startWorkerProcess = async (env: Record<string, string | undefined> = {}) => {
    const child = await spawnWorker(h, dataDir, env);
    workers.push(child);
    return child;
  };

  async function upload(bytes: Buffer, name: string): Promise<string> {
    const principal = { tenantId: h.tenantA };
    const c = await createCheckpoint({
      ctx: h.ctx,
      principal,
      input: { name, body: Readable.from([bytes]) },
    });
    return c.id;
  }

  async function createdJob(response: Promise<Response>): Promise<JobBody> {
    const res = await response;
    const body = (await res.json()) as JobBody;
    expect(res.status, JSON.stringify(body)).toBe(202);
    return body;
  }

  async function outputsOf(jobIds: string[]) {
    return h.ctx.db.select().from(schema.checkpoints).where(inArray(schema.checkpoints.jobId, jobIds));
  }

  /** Waits until a worker is merging job `id` (running, with progress), so that killing it interrupts the merge. */
  async function untilMerging(id: string): Promise<void> {
    for (;;) {
      const job = (await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody;
      if (job.status === "running" && job.progress > 0) return;
      expect(job.status).not.toBe("succeeded");
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), "papa-workers-"));
    h = await startHarness("postgres", "filesystem", {
      storeDir: join(dataDir, "objects"),
      limits: { maxUploadBytes: 2 ** 30, maxMergeInputBytes: 2 ** 31 },
    });
  });
  afterAll(async () => {
    for (const w of workers) if (w.exitCode === null) w.kill("SIGKILL");
    await h.close();
    await rm(dataDir, { recursive: true, force: true });
  });

  it("retries a merge whose worker was killed (SIGKILL) and registers exactly one set of outputs", async () => {
    const inputs: string[] = [];
    for (const k of [0, 1, 2, 3]) inputs.push(await upload(bigMember(k), `big-${k}`));
    const first = await startWorkerProcess({ PAPA_MERGE_THREADS: "0" });
    const { id } = await createdJob(postMerge(h, { method: "papa-pull", inputs, beta: 0.5 }));
    await untilMerging(id);
    first.kill("SIGKILL");
    await once(first, "exit");
    expect(((await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody).status).toBe("running");

    await startWorkerProcess();
    const job = await waitForJob(h, id, 60_000);
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    const outputs = await outputsOf([id]);
    expect(outputs).toHaveLength(4);
    expect(outputs.map((o) => o.id).sort()).toEqual((job.result?.checkpoints ?? []).map((c) => c.id).sort());
    const objects = await h.ctx.store.list(`tenants/${h.tenantA}/`);
    expect(objects).toHaveLength(8);
    const edges = await h.ctx.db.select().from(schema.lineageEdges).where(eq(schema.lineageEdges.jobId, id));
    expect(edges).toHaveLength(16);
  });

  it("fails a running merge on SIGTERM after the drain timeout, and another worker finishes it", async () => {
    const inputs: string[] = [];
    for (const k of [4, 5, 6, 7]) inputs.push(await upload(bigMember(k), `big-${k}`));
    const survivor = workers.find((w) => w.exitCode === null);
    survivor?.kill("SIGSTOP"); // only the worker under test may take the job
    const draining = await startWorkerProcess({ PAPA_MERGE_THREADS: "0", PAPA_WORKER_DRAIN_SECONDS: "0" });
    const { id } = await createdJob(postMerge(h, { method: "papa-pull", inputs, beta: 0.5 }));
    for (;;) {
      const job = (await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody;
      if (job.status === "running") break;
      await new Promise((r) => setTimeout(r, 20));
    }
    draining.kill("SIGTERM");
    const [code] = await once(draining, "exit");
    expect(code, draining.output()).toBe(0);
    survivor?.kill("SIGCONT");
    const job = await waitForJob(h, id, 60_000);
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    expect(await outputsOf([id])).toHaveLength(4);
  });

  it("cancels a running merge: no output registered, no blob left", async () => {
    const sources: string[] = [];
    for (const name of ["big-0", "big-1", "big-2", "big-3"]) {
      const [row] = await h.ctx.db.select().from(schema.checkpoints).where(eq(schema.checkpoints.name, name));
      sources.push(row?.id ?? "");
    }
    const before = await h.ctx.store.list(`tenants/${h.tenantA}/`);
    const { id } = await createdJob(postMerge(h, { method: "papa-pull", inputs: sources, beta: 0.25 }));
    for (;;) {
      const job = (await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody;
      if (job.status === "running") break;
      await new Promise((r) => setTimeout(r, 20));
    }
    expect((await h.request(`/v1/jobs/${id}/cancel`, { method: "POST" })).status).toBe(200);
    // The worker notices at its next progress report, stops, and deletes what it wrote.
    const until = Date.now() + 15_000;
    while (Date.now() < until && (await h.ctx.store.list(`tenants/${h.tenantA}/`)).length !== before.length) {
      await new Promise((r) => setTimeout(r, 100));
    }
    await new Promise((r) => setTimeout(r, 1000));
    expect(((await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody).status).toBe("canceled");
    expect(await outputsOf([id])).toEqual([]);
    expect(await h.ctx.store.list(`tenants/${h.tenantA}/`)).toEqual(before);
  });

  it("runs 20 concurrent merge jobs on two workers, each exactly once", async () => {
    await startWorkerProcess();
    const inputs: string[] = [];
    for (const k of [1, 2, 3]) {
      inputs.push(
        await upload(
          buildSafetensors([{ name: "w", dtype: "F32", shape: [4], data: f32([k, k, k, k]) }]),
          `small-${k}`,
        ),
      );
    }
    const created = await Promise.all(
      Array.from({ length: 20 }, (_, seed) =>
        postMerge(h, { method: "papa-2", inputs, seed, name: `pairs-${seed}` }),
      ),
    );
    const ids = await Promise.all(created.map(async (r) => (await createdJob(Promise.resolve(r))).id));
    const jobs = await Promise.all(ids.map((id) => waitForJob(h, id, 60_000)));
    expect(jobs.map((j) => j.status)).toEqual(Array(20).fill("succeeded"));
    const outputs = await outputsOf(ids);
    expect(outputs).toHaveLength(60);
    expect(new Set(outputs.map((o) => o.storageKey)).size).toBe(60);
    const stored = await h.ctx.store.list(`tenants/${h.tenantA}/`);
    expect(new Set(stored).size).toBe(stored.length);
    for (const o of outputs) expect(stored).toContain(o.storageKey);
  });

  it("fails a merge whose every attempt's worker dies, and deletes what its attempts wrote", async () => {
    for (const w of workers) if (w.exitCode === null) w.kill("SIGKILL"); // only this test's workers take it
    const inputs: string[] = [];
    for (const k of [8, 9, 10, 11]) inputs.push(await upload(bigMember(k), `big-${k}`));
    const before = await h.ctx.store.list(`tenants/${h.tenantA}/`);
    const env = { PAPA_MERGE_THREADS: "0" };
    const first = await startWorkerProcess(env);
    const { id } = await createdJob(postMerge(h, { method: "papa-pull", inputs, beta: 0.5 }));
    // No retry: the first attempt is the last. (A job carries the policy it was sent with.)
    await h.ctx.db.execute(sql`update pgboss.job set retry_limit = 0 where id = ${id}`);
    await untilMerging(id);
    first.kill("SIGKILL");
    await once(first, "exit");
    // As if the attempt had stored its first output before it died.
    const stored = checkpointKey(h.tenantA, derivedId(id, "output-0"));
    await h.ctx.store.put(stored, Readable.from([Buffer.from("written before the kill")]));

    await startWorkerProcess(env);
    const job = await waitForJob(h, id, 30_000);
    expect(job.status).toBe("failed");
    expect(job.problem).toMatchObject({ title: "Merge failed" });
    expect(job.problem?.detail).toContain("worker was killed");
    expect(await outputsOf([id])).toEqual([]);
    expect(await h.ctx.store.list(`tenants/${h.tenantA}/`)).toEqual(before);
  });
});

describe("a training worker that dies", () => {
  let h: Harness;
  let dataDir: string;
  const workers: ChildProcess[] = [];
  beforeAll(async () => {
    dataDir = await mkdtemp(join(tmpdir(), "papa-trainers-"));
    // The API's lease is short too: a job's first lease (when it was enqueued with the lease as
    // its pg-boss expiry) must not cut a healthy attempt either.
    const queue = { leaseSeconds: 2 };
    h = await startHarness("postgres", "filesystem", { storeDir: join(dataDir, "objects"), queue });
  });
  // A test that fails leaves no worker to take the next test's jobs.
  afterEach(() => {
    for (const w of workers.splice(0)) if (w.exitCode === null) w.kill("SIGKILL");
  });
  afterAll(async () => {
    await h.close();
    await rm(dataDir, { recursive: true, force: true });
  });

  const train = async (epochs: number): Promise<string> => {
    const res = await h.request("/v1/trainings", {
      method: "POST",
      body: JSON.stringify({
        dataset: "mnist",
        max_train_examples: 1500,
        max_test_examples: 100,
        model: { kind: "mlp", hidden: [64] },
        population: { size: 2, variant: "papa", every_k_steps: 5 },
        epochs,
        batch_size: 16,
      }),
      headers: { "Content-Type": "application/json" },
    });
    return ((await res.json()) as JobBody).id;
  };
  const jobOf = async (id: string) =>
    (await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody & {
      started_at: string | null;
      finished_at: string | null;
      progress_detail: { epoch?: number } | null;
    };

  it("is retried within 2 minutes of its worker's death, on the default lease", async () => {
    const defaults = { PAPA_JOB_LEASE_SECONDS: undefined, PAPA_QUEUE_MAINTENANCE_SECONDS: undefined };
    const first = await spawnWorker(h, dataDir, { PAPA_WORKER_QUEUES: "train", ...defaults });
    workers.push(first);
    const id = await train(6);
    let job = await jobOf(id);
    while (job.status !== "running" || job.progress === 0) {
      await new Promise((r) => setTimeout(r, 50));
      job = await jobOf(id);
    }
    const firstStart = job.started_at;
    first.kill("SIGKILL");
    await once(first, "exit");
    const killed = Date.now();
    workers.push(await spawnWorker(h, dataDir, { PAPA_WORKER_QUEUES: "train", ...defaults }));
    while ((await jobOf(id)).started_at === firstStart) {
      expect(Date.now() - killed).toBeLessThan(120_000);
      await new Promise((r) => setTimeout(r, 500));
    }
    const done = await waitForJob(h, id, 120_000);
    expect(done.status, JSON.stringify(done.problem)).toBe("succeeded");
  }, 240_000);

  it("keeps a healthy job running past its lease: the lease is renewed, not a cap", async () => {
    // A 2 s lease (PAPA_TRAIN_EXPIRE_SECONDS was the old, fixed cap) and a training of several.
    const env = { PAPA_WORKER_QUEUES: "train", PAPA_JOB_LEASE_SECONDS: "2", PAPA_TRAIN_EXPIRE_SECONDS: "2" };
    const worker = await spawnWorker(h, dataDir, env);
    workers.push(worker);
    // Long enough to outlive three leases on a fast day (40 epochs ran 5.7 s on CI's machine).
    const id = await train(120);
    await waitForJob(h, id, 240_000);
    const job = await jobOf(id);
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    const ran = Date.parse(job.finished_at ?? "") - Date.parse(job.started_at ?? "");
    expect(ran).toBeGreaterThan(3 * 2000);
    worker.kill("SIGKILL");
    // Never failed by expiry: its first attempt is the one that finished.
    const result = await h.ctx.db.execute(sql`select retry_count from pgboss.job where id = ${id}`);
    expect((result as unknown as { rows: unknown[] }).rows).toEqual([{ retry_count: 0 }]);
    const lines = worker.output();
    expect(lines).not.toContain("job attempt failed");
    expect(lines).not.toContain("lease lost");
    expect(lines).not.toContain("resuming training");
  }, 300_000);

  it("is retried and resumes from its last completed epoch", async () => {
    const first = await spawnWorker(h, dataDir, { PAPA_WORKER_QUEUES: "train" });
    workers.push(first);
    // Epochs enough that the kill, once an epoch is saved, lands before the last one (4 could
    // all finish between two polls on a fast day).
    const id = await train(12);
    const stateKey = `tenants/${h.tenantA}/jobs/${id}/training-state.safetensors`;
    for (;;) {
      const job = (await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody & {
        progress_detail: { epoch?: number } | null;
      };
      expect(job.status).not.toBe("succeeded");
      if ((job.progress_detail?.epoch ?? 0) >= 1 && (await h.ctx.store.stat(stateKey))) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    first.kill("SIGKILL");
    await once(first, "exit");

    const second = await spawnWorker(h, dataDir, { PAPA_WORKER_QUEUES: "train" });
    workers.push(second);
    const job = await waitForJob(h, id, 120_000);
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    const resumed = second
      .output()
      .split("\n")
      .filter((l) => l.includes('"msg":"resuming training"'))
      .map((l) => JSON.parse(l) as { completed_epochs: number });
    expect(resumed).toHaveLength(1);
    expect(resumed[0]?.completed_epochs).toBeGreaterThanOrEqual(1);
    expect(await h.ctx.store.stat(stateKey)).toBeNull();
    expect(await outputsOfJob(h, id)).toHaveLength(4);
  });
});

async function outputsOfJob(h: Harness, jobId: string) {
  return h.ctx.db.select().from(schema.checkpoints).where(eq(schema.checkpoints.jobId, jobId));
}

describe("the worker's housekeeping", () => {
  it.each(["filesystem", "s3"] as const)(
    "removes what dead writers left on %s periodically, and leaves live writes alone",
    async (store) => {
      const root = await mkdtemp(join(tmpdir(), "papa-sweep-"));
      const h = await startHarness("pglite", store, { storeDir: root });
      try {
        await startWorker(h.ctx, {
          ...TEST_WORKER,
          queues: [],
          sweepIntervalSeconds: 1,
          abandonedWriteSeconds: store === "s3" ? 0 : 600,
        });
        if (store === "filesystem") {
          await mkdir(join(root, ".tmp"), { recursive: true });
          await writeFile(join(root, ".tmp", "dead"), "left by a writer that died");
          await writeFile(join(root, ".tmp", "live"), "being written");
          const hourAgo = new Date(Date.now() - 3600 * 1000);
          await utimes(join(root, ".tmp", "dead"), hourAgo, hourAgo);
          await until(async () => !(await readdir(join(root, ".tmp"))).includes("dead"));
          expect(await readdir(join(root, ".tmp"))).toEqual(["live"]);
        } else {
          // The marker of a multipart upload whose writer is gone (threshold 0: any marker is stale).
          await h.ctx.store.put(
            "_writes/dead",
            Readable.from([JSON.stringify({ key: "x/y.bin", uploadId: "gone" })]),
          );
          await until(async () => (await h.ctx.store.list("_writes/")).length === 0);
        }
      } finally {
        await h.close();
        await rm(root, { recursive: true, force: true });
      }
    },
  );
});

async function until(check: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
