import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { emptyPostgresDatabase, testStore } from "./helpers/backends.js";
import { type Harness, listen, startHarness, TEST_LIMITS } from "./helpers/harness.js";
import { buildSafetensors, f32, smallCheckpoint } from "./helpers/safetensors.js";

describe("over real sockets", () => {
  let h: Harness;
  let base: string;
  let server: Awaited<ReturnType<typeof listen>>;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem");
    server = await listen(h);
    base = server.base;
  });
  afterAll(async () => {
    await server.close();
    await h.close();
  });

  it("leaves nothing behind when the client disconnects mid-upload", async () => {
    const before = await h.leftovers();
    const file = buildSafetensors([
      { name: "w", dtype: "F32", shape: [10000], data: f32(new Array(10000).fill(1)) },
    ]);
    await new Promise<void>((resolve) => {
      const req = httpRequest(`${base}/v1/checkpoints?name=gone`, {
        method: "POST",
        headers: {
          Authorization: `Bearer ${h.keyA}`,
          "Content-Type": "application/octet-stream",
          "Content-Length": String(file.length),
        },
      });
      req.on("error", () => resolve());
      req.write(file.subarray(0, 20_000));
      setTimeout(() => {
        req.destroy();
        resolve();
      }, 200);
    });
    let after = await h.leftovers();
    for (let i = 0; i < 50 && JSON.stringify(after) !== JSON.stringify(before); i++) {
      await new Promise((r) => setTimeout(r, 50));
      after = await h.leftovers();
    }
    expect(after).toEqual(before);
    const aborted = h.logs.map((l) => JSON.parse(l)).find((l) => l.msg === "request aborted by the client");
    expect(aborted).toBeDefined();
  });

  it("streams an upload in chunks and serves it back", async () => {
    const file = smallCheckpoint(9);
    const res = await fetch(`${base}/v1/checkpoints?name=chunked`, {
      method: "POST",
      headers: { Authorization: `Bearer ${h.keyA}`, "Content-Type": "application/octet-stream" },
      body: new ReadableStream({
        start(controller) {
          for (let i = 0; i < file.length; i += 10) controller.enqueue(file.subarray(i, i + 10));
          controller.close();
        },
      }),
      duplex: "half",
    } as RequestInit);
    expect(res.status).toBe(201);
    const { weights_url } = (await res.json()) as { weights_url: string };
    const back = await fetch(base + weights_url, { headers: { Authorization: `Bearer ${h.keyA}` } });
    expect(Buffer.from(await back.arrayBuffer()).equals(file)).toBe(true);
  });

  it("refuses request heads over the header size limit with 431", async () => {
    const res = await fetch(`${base}/healthz`, {
      headers: { "X-Padding": "x".repeat(TEST_LIMITS.maxHttpHeaderBytes) },
    });
    expect(res.status).toBe(431);
  });
});

interface Started {
  child: ChildProcess;
  base: string;
  stderr: () => string;
  stop(): Promise<number | null>;
}

/** Starts `src/server.ts` as a user would, with only environment variables. */
async function startServer(env: Record<string, string>): Promise<Started> {
  const child = spawn(process.execPath, ["--import", "tsx", "src/server.ts"], {
    env: { PATH: process.env.PATH ?? "", PORT: "0", HOST: "127.0.0.1", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  const base = await new Promise<string>((resolve, reject) => {
    child.stdout?.on("data", (d: Buffer) => {
      stdout += d.toString();
      const match = stdout.match(/"msg":"listening","url":"([^"]+)"/);
      if (match?.[1]) resolve(match[1]);
    });
    child.on("exit", (code) => reject(new Error(`server exited with ${code}: ${stderr}`)));
  });
  return {
    child,
    base,
    stderr: () => stderr,
    stop: () =>
      new Promise((resolve) => {
        child.on("exit", (code) => resolve(code));
        child.kill("SIGTERM");
      }),
  };
}

async function roundTrip(base: string, key: string): Promise<void> {
  const file = smallCheckpoint(11);
  const auth = { Authorization: `Bearer ${key}` };
  const up = await fetch(`${base}/v1/checkpoints?name=e2e`, {
    method: "POST",
    headers: { ...auth, "Content-Type": "application/octet-stream" },
    body: file,
  });
  expect(up.status).toBe(201);
  const { id } = (await up.json()) as { id: string };
  const listed = (await (await fetch(`${base}/v1/checkpoints`, { headers: auth })).json()) as {
    items: { id: string }[];
  };
  expect(listed.items.map((c) => c.id)).toContain(id);
  const down = await fetch(`${base}/v1/checkpoints/${id}/weights`, { headers: auth });
  expect(Buffer.from(await down.arrayBuffer()).equals(file)).toBe(true);
}

describe("the server process", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "papa-e2e-"));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it("starts on embedded defaults, prints a key once, and keeps data across restarts", async () => {
    const first = await startServer({ PAPA_DATA_DIR: dir });
    const key = first.stderr().match(/papa_[A-Za-z0-9_-]{43}/)?.[0];
    expect(key).toBeDefined();
    const ready = (await (await fetch(`${first.base}/readyz`)).json()) as { training_backend: string };
    expect(ready).toMatchObject({ status: "ready", database: "pglite", store: "filesystem" });
    // The in-process worker trains on the fastest backend that loads: never cpu when wasm works.
    expect(["tensorflow", "wasm"]).toContain(ready.training_backend);
    await roundTrip(first.base, key ?? "");
    expect(await first.stop()).toBe(0);

    const second = await startServer({ PAPA_DATA_DIR: dir });
    expect(second.stderr()).not.toContain("papa_");
    const listed = await fetch(`${second.base}/v1/checkpoints?name=e2e`, {
      headers: { Authorization: `Bearer ${key}` },
    });
    expect(((await listed.json()) as { items: unknown[] }).items).toHaveLength(1);
    expect(await second.stop()).toBe(0);
  });

  it("runs on Postgres and S3 given DATABASE_URL and S3_*", async () => {
    const database = await emptyPostgresDatabase();
    const s3 = await testStore("s3");
    const key = "papa_configured-bootstrap-key-0123456789";
    try {
      const started = await startServer({
        DATABASE_URL: database.value,
        S3_BUCKET: "papa-test",
        S3_ENDPOINT: s3.value.endpoint ?? "",
        S3_FORCE_PATH_STYLE: "true",
        S3_ACCESS_KEY_ID: "S3RVER",
        S3_SECRET_ACCESS_KEY: "S3RVER",
        PAPA_API_KEY: key,
        PAPA_DATA_DIR: dir,
      });
      expect(started.stderr()).not.toContain("papa_");
      const ready = (await (await fetch(`${started.base}/readyz`)).json()) as object;
      expect(ready).toMatchObject({ status: "ready", database: "postgres", store: "s3" });
      await roundTrip(started.base, key);
      expect(await s3.value.everything()).toHaveLength(1);
      expect(await started.stop()).toBe(0);
    } finally {
      await s3.close();
      await database.close();
    }
  });

  it("fails fast naming the bad variable", async () => {
    await expect(startServer({ PORT: "eighty", PAPA_DATA_DIR: dir })).rejects.toThrow(/PORT/);
  });
});
