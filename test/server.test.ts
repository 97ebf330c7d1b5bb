import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { connect as netConnect, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { emptyPostgresDatabase, testStore } from "./helpers/backends.js";
import { type Harness, listen, startHarness, TEST_HTTP } from "./helpers/harness.js";
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
      headers: { "X-Padding": "x".repeat(TEST_HTTP.maxHeaderBytes) },
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

/**
 * Starts `src/server.ts` as a user would, with only environment variables; with `openFiles`,
 * under that limit of open files (as a service manager may set one).
 */
async function startServer(
  env: Record<string, string>,
  options: { openFiles?: number } = {},
): Promise<Started> {
  const node = [process.execPath, "--import", "tsx", "src/server.ts"];
  const [command, ...args] = options.openFiles
    ? ["prlimit", `--nofile=${options.openFiles}:${options.openFiles}`, ...node]
    : node;
  const child = spawn(command as string, args, {
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

/** A socket to `base` from `localAddress`, connected (or failed: resolves either way). */
function connectFrom(base: string, localAddress: string): Promise<Socket> {
  const { hostname, port } = new URL(base);
  return new Promise((resolve) => {
    const socket = netConnect({ host: hostname, port: Number(port), localAddress });
    socket.on("connect", () => resolve(socket));
    socket.on("error", () => resolve(socket));
  });
}

/** Resolves when the socket closes, or with "open" after `ms`. */
function closedWithin(socket: Socket, ms: number): Promise<"closed" | "open"> {
  if (socket.destroyed) return Promise.resolve("closed");
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve("open"), ms);
    socket.on("close", () => {
      clearTimeout(timer);
      resolve("closed");
    });
  });
}

describe("slow and partial requests", () => {
  let h: Harness;
  let server: Awaited<ReturnType<typeof listen>>;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem");
    server = await listen(h, { headersTimeoutSeconds: 1, idleTimeoutSeconds: 1 });
  });
  afterAll(async () => {
    await server.close();
    await h.close();
  });

  it("closes a connection whose request head does not arrive in time, however it trickles", async () => {
    const socket = await connectFrom(server.base, "127.0.0.1");
    let answer = "";
    socket.on("data", (d: Buffer) => {
      answer += d.toString();
    });
    // A byte every 300 ms: never idle, never a whole head.
    const head = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let sent = 0;
    const trickle = setInterval(() => {
      if (!socket.destroyed && sent < head.length) socket.write(head[sent++] ?? "");
    }, 300);
    const outcome = await closedWithin(socket, 6000);
    clearInterval(trickle);
    expect(outcome).toBe("closed");
    expect(answer).toMatch(/^HTTP\/1.1 408/);
  });

  it("closes an upload whose body stalls, and keeps nothing of it", async () => {
    const before = await h.leftovers();
    const socket = await connectFrom(server.base, "127.0.0.1");
    const file = smallCheckpoint(3);
    socket.write(
      `POST /v1/checkpoints?name=stalled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${h.keyA}\r\n` +
        `Content-Type: application/octet-stream\r\nContent-Length: ${file.length}\r\n\r\n`,
    );
    socket.write(file.subarray(0, 20));
    expect(await closedWithin(socket, 4000)).toBe("closed");
    let after = await h.leftovers();
    for (let i = 0; i < 40 && JSON.stringify(after) !== JSON.stringify(before); i++) {
      await new Promise((r) => setTimeout(r, 50));
      after = await h.leftovers();
    }
    expect(after).toEqual(before);
  });

  it("lets a slow upload finish as long as it keeps moving", async () => {
    const file = buildSafetensors([
      { name: "w", dtype: "F32", shape: [4096], data: f32(new Array(4096).fill(0.5)) },
    ]);
    const slices = 8;
    const res = await fetch(`${server.base}/v1/checkpoints?name=slow`, {
      method: "POST",
      headers: { Authorization: `Bearer ${h.keyA}`, "Content-Type": "application/octet-stream" },
      body: new ReadableStream({
        async start(controller) {
          const size = Math.ceil(file.length / slices);
          for (let i = 0; i < slices; i++) {
            controller.enqueue(file.subarray(i * size, (i + 1) * size));
            await new Promise((r) => setTimeout(r, 400)); // 3.2 s in all, each pause under 1 s
          }
          controller.close();
        },
      }),
      duplex: "half",
    } as RequestInit);
    expect(res.status).toBe(201);
  });
});

describe("a client holding thousands of half-open connections", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "papa-flood-"));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it("gets a capped share; /healthz from another client answers at once", async () => {
    // A server that may hold 2048 files, as a service manager might allow; the client tries 5000.
    const started = await startServer(
      { PAPA_DATA_DIR: dir, PAPA_IN_PROCESS_WORKER: "false", PAPA_HTTP_MAX_CONNECTIONS_PER_CLIENT: "100" },
      { openFiles: 2048 },
    );
    const flood: Socket[] = [];
    try {
      for (let batch = 0; batch < 50; batch++) {
        const sockets = await Promise.all(
          Array.from({ length: 100 }, () => connectFrom(started.base, "127.0.0.2")),
        );
        for (const s of sockets) {
          s.on("error", () => undefined);
          if (!s.destroyed) s.write("GET /healthz HTTP/1.1\r\nHost: x\r\n");
        }
        flood.push(...sockets);
      }
      await new Promise((r) => setTimeout(r, 200));
      const t0 = performance.now();
      const health = await fetch(`${started.base}/healthz`, { signal: AbortSignal.timeout(5000) }).catch(
        (err: Error) => err,
      );
      expect(health instanceof Response ? health.status : health.message).toBe(200);
      expect(performance.now() - t0).toBeLessThan(1000);
      expect(flood.filter((s) => !s.destroyed).length).toBeLessThanOrEqual(100);
    } finally {
      for (const s of flood) s.destroy();
      await started.stop();
    }
  });
});
