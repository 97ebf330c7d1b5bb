import { join, resolve } from "node:path";
import type { Config } from "./config.js";
import { type DatabaseHandle, openDatabase } from "./db/client.js";
import { JobQueue } from "./jobs/queue.js";
import { createJsonLogger, type Logger } from "./logger.js";
import { installedDatasets } from "./ml/datasets.js";
import { bootstrapApiKey, KEY_TRUST_MS } from "./services/api-keys/api-keys.js";
import type { ServiceContext } from "./services/context.js";
import { JobWatch } from "./services/jobs/job-watch.js";
import { RateLimits } from "./services/rate-limits.js";
import { RecentValues } from "./services/recent-values.js";
import type { ObjectStore } from "./storage/object-store.js";
import { openStore } from "./storage/open-store.js";

export interface Runtime {
  ctx: ServiceContext;
  close(): Promise<void>;
}

/** The configuration a runtime is assembled from. */
export type RuntimeConfig = Pick<Config, "limits" | "presignExpiresSeconds" | "worker" | "datasets">;

/**
 * Assembles the service context on an open database and store: the job queue on that database,
 * started. `close` drains the queue's workers; the database and the store stay the caller's.
 * (Entry points use `openRuntime`; tests and benchmarks bring their own database and store.)
 */
export async function assembleRuntime(parts: {
  database: DatabaseHandle;
  store: ObjectStore;
  config: RuntimeConfig;
  logger: Logger;
}): Promise<Runtime> {
  const { database, store, config, logger } = parts;
  const w = config.worker;
  const queue = new JobQueue(
    database,
    {
      policy: {
        retryLimit: w.retryLimit,
        retryDelaySeconds: w.retryDelaySeconds,
        leaseSeconds: w.leaseSeconds,
      },
      maintenanceIntervalSeconds: w.maintenanceSeconds,
    },
    logger,
  );
  await queue.start();
  const ctx: ServiceContext = {
    db: database.db,
    databaseKind: database.kind,
    store,
    queue,
    limits: config.limits,
    rateLimits: new RateLimits(database.db, database.kind, config.limits),
    knownKeys: new RecentValues(KEY_TRUST_MS),
    jobWatch: new JobWatch(database.db, config.limits.maxEventStreamsPerTenant, logger),
    trainer: { backend: null, problem: null },
    datasets: config.datasets ?? (await installedDatasets(w.fashionMnistDir)),
    presignExpiresSeconds: config.presignExpiresSeconds,
    logger,
  };
  return { ctx, close: () => queue.stop(w.drainSeconds * 1000) };
}

/**
 * Builds the dependencies the configuration names: Postgres or PGlite (migrated), S3 or the
 * filesystem store, the job queue on the same database. Embedded defaults keep everything
 * under the data dir. `close` drains the queue's workers first.
 */
export async function openRuntime(
  config: Config,
  logger: Logger = createJsonLogger(config.logLevel),
): Promise<Runtime> {
  const dataDir = resolve(config.dataDir);
  const database = await openDatabase(
    config.databaseUrl ? { url: config.databaseUrl } : { pgliteDir: join(dataDir, "pglite") },
    logger,
  );
  const store = openStore(
    config.s3 ? { kind: "s3", options: config.s3 } : { kind: "filesystem", root: join(dataDir, "objects") },
  );
  const runtime = await assembleRuntime({ database, store, config, logger });
  return {
    ctx: runtime.ctx,
    close: async () => {
      await runtime.close();
      store.close();
      await database.close();
    },
  };
}

/**
 * Registers the configured API key, or on a database without any key creates one and prints it
 * once, on stderr, outside the JSON log stream so that log shippers do not collect it.
 */
export async function ensureApiKey(ctx: ServiceContext, configuredKey: string | undefined): Promise<void> {
  const { createdSecret } = await bootstrapApiKey({ ctx, input: { configuredKey } });
  if (createdSecret) {
    process.stderr.write(
      `\nNo API key existed, so one was created. It is shown only now; keep it:\n\n  ${createdSecret}\n\n`,
    );
  }
}
