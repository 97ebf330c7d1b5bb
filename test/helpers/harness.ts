import { AsyncLocalStorage } from "node:async_hooks";
import type { AddressInfo } from "node:net";
import { count } from "drizzle-orm";
import { createApp } from "../../src/app.js";
import { type HttpServerConfig, type Limits, loadConfig, type WorkerConfig } from "../../src/config.js";
import { schema } from "../../src/db/client.js";
import { createNodeServer } from "../../src/http/node-server.js";
import { startWorker } from "../../src/jobs/worker.js";
import { createJsonLogger } from "../../src/logger.js";
import type { BuiltInDataset } from "../../src/ml/datasets.js";
import { assembleRuntime } from "../../src/runtime.js";
import { createApiKey } from "../../src/services/api-keys/api-keys.js";
import type { ServiceContext } from "../../src/services/context.js";
import { createTenant } from "../../src/services/tenants/create-tenant.js";
import { type DatabaseKind, type StoreKind, testDatabase, testStore } from "./backends.js";
import { checkResponse } from "./contract.js";

export const TEST_LIMITS = {
  maxUploadBytes: 64 * 1024,
  maxSafetensorsHeaderBytes: 4096,
  maxMergeInputBytes: 1024 * 1024,
  maxMergeHeaderBytes: 16 * 1024,
  maxDatasetBytes: 4 * 1024 * 1024,
  maxJsonBodyBytes: 64 * 1024,
  maxTrainingMemoryBytes: 3 * 1024 ** 3,
  maxQueuedJobsPerTenant: 100,
  maxRunningJobsPerTenant: 8,
  maxEventStreamsPerTenant: 20,
  requestsPerKeyPerMinute: 0,
  authFailuresPerMinute: 0,
};

export const TEST_WORKER: WorkerConfig = {
  inProcess: true,
  queues: ["merge", "train"],
  backend: "cpu",
  fashionMnistDir: "/nonexistent/fashion-mnist",
  mergeConcurrency: 2,
  trainConcurrency: 2,
  mergeThreads: 1,
  retryLimit: 2,
  retryDelaySeconds: 1,
  leaseSeconds: 30,
  drainSeconds: 5,
  maintenanceSeconds: 1,
  sweepIntervalSeconds: 300,
  roundCheckSeconds: 1,
  abandonedWriteSeconds: 900,
};

export interface Harness {
  app: ReturnType<typeof createApp>;
  /** The Postgres database's URL (Postgres harnesses only), for worker processes. */
  databaseUrl: string | undefined;
  ctx: ServiceContext;
  /** Every JSON log line the app wrote. */
  logs: string[];
  /** Two tenants, each with a key. */
  keyA: string;
  keyB: string;
  tenantA: string;
  /** A request to the app (as tenant A by default); the response is checked against openapi.yaml. */
  request(path: string, init?: RequestInit & { key?: string | null }): Promise<Response>;
  /** Objects and temp files in the store, and rows in each table that uploads touch. */
  leftovers(): Promise<{ objects: string[]; checkpoints: number }>;
  close(): Promise<void>;
}

/**
 * The app on real backends: PGlite or a fresh Postgres database, a filesystem or s3rver store,
 * the pg-boss queue on that database, and (with `worker`) a worker in the same process.
 */
export async function startHarness(
  db: DatabaseKind,
  store: StoreKind,
  options: {
    worker?: boolean;
    storeDir?: string;
    limits?: Partial<Limits>;
    queue?: Partial<WorkerConfig>;
    /** The built-in datasets it offers; by default, what this machine has. */
    datasets?: BuiltInDataset[];
  } = {},
): Promise<Harness> {
  const database = await testDatabase(db);
  const objects = await testStore(store, options.storeDir);
  const logs: string[] = [];
  const logger = createJsonLogger("debug", (line) => logs.push(line));
  const runtime = await assembleRuntime({
    database: database.value,
    store: objects.value.store,
    config: {
      limits: { ...TEST_LIMITS, ...options.limits },
      presignExpiresSeconds: 900,
      worker: { ...TEST_WORKER, ...options.queue },
      datasets: options.datasets,
    },
    logger,
  });
  const { ctx } = runtime;
  if (options.worker) await startWorker(ctx, { ...TEST_WORKER, ...options.queue });
  const app = createApp(ctx);
  const tenantA = (await createTenant({ ctx, input: { name: "a" } })).id;
  const tenantB = (await createTenant({ ctx, input: { name: "b" } })).id;
  const keyA = (await createApiKey({ ctx, principal: { tenantId: tenantA }, input: {} })).secret;
  const keyB = (await createApiKey({ ctx, principal: { tenantId: tenantB }, input: {} })).secret;
  return {
    app,
    databaseUrl: database.url,
    ctx,
    logs,
    keyA,
    keyB,
    tenantA,
    request: async (path, init = {}) => {
      const { key = keyA, ...rest } = init;
      const headers = new Headers(rest.headers);
      if (key !== null) headers.set("Authorization", `Bearer ${key}`);
      const res = await app.request(path, { ...rest, headers });
      await checkResponse(rest.method ?? "GET", path, res);
      return res;
    },
    leftovers: async () => {
      const [rows] = await ctx.db.select({ n: count() }).from(schema.checkpoints);
      return { objects: await objects.value.everything(), checkpoints: rows?.n ?? -1 };
    },
    close: async () => {
      await runtime.close();
      await database.close();
      await objects.close();
    },
  };
}

export function upload(
  h: Harness,
  body: RequestInit["body"],
  name = "model",
  init: RequestInit & { key?: string } = {},
) {
  return h.request(`/v1/checkpoints?name=${encodeURIComponent(name)}`, {
    method: "POST",
    body,
    ...init,
    headers: { "Content-Type": "application/octet-stream", ...(init.headers as Record<string, string>) },
  });
}

/** The Node server's settings in tests: the defaults, with a head limit tests can reach. */
export const TEST_HTTP: HttpServerConfig = { ...loadConfig({}).http, maxHeaderBytes: 16 * 1024 };

/** Serves the harness's app on a free loopback port, with the Node server's defences. */
export async function listen(
  h: Harness,
  http: Partial<HttpServerConfig> = {},
): Promise<{ base: string; close(): Promise<void> }> {
  const server = createNodeServer(h.app, { ...TEST_HTTP, ...http });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    base: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/**
 * Counts `db.select` queries until `stop`. With `onlyWithin`, only those made inside a call of
 * `within` (its async work, not a background poller's that happens to run meanwhile).
 */
export function countSelects(
  h: Harness,
  options: { onlyWithin?: boolean } = {},
): { count(): number; stop(): void; within<T>(work: () => Promise<T>): Promise<T> } {
  const scope = new AsyncLocalStorage<true>();
  let selects = 0;
  const select = h.ctx.db.select.bind(h.ctx.db);
  h.ctx.db.select = ((...args: Parameters<typeof select>) => {
    if (!options.onlyWithin || scope.getStore()) selects++;
    return select(...args);
  }) as typeof select;
  return {
    count: () => selects,
    stop: () => {
      h.ctx.db.select = select;
    },
    within: (work) => scope.run(true, work),
  };
}
