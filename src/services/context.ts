import type { Limits } from "../config.js";
import type { Database } from "../db/client.js";
import type { JobQueue } from "../jobs/queue.js";
import type { Logger } from "../logger.js";
import type { BuiltInDataset } from "../ml/datasets.js";
import type { ObjectStore } from "../storage/object-store.js";
import type { JobWatch } from "./jobs/job-watch.js";
import type { RateLimits } from "./rate-limits.js";
import type { RecentValues } from "./recent-values.js";

/** Everything a service needs, built once at start and passed in. */
export interface ServiceContext {
  db: Database;
  databaseKind: "postgres" | "pglite";
  store: ObjectStore;
  queue: JobQueue;
  limits: Limits;
  rateLimits: RateLimits;
  /** API keys this instance looked up lately, by hash (see `authenticateApiKey`). */
  knownKeys: RecentValues<string, Principal>;
  /** Event streams' view of jobs (one process-wide poll). */
  jobWatch: JobWatch;
  /** Whether this process's training worker can train: set by its probe at start (`startWorker`). */
  trainer: TrainerState;
  /** The built-in datasets a training or an evaluated merge may name here (`PAPA_DATASETS`). */
  datasets: readonly BuiltInDataset[];
  presignExpiresSeconds: number;
  logger: Logger;
}

/** A training worker's probe of its TensorFlow.js backend; all null where no training worker runs. */
export interface TrainerState {
  backend: "tensorflow" | "wasm" | "cpu" | null;
  /** Why the backend cannot run, when it cannot. */
  problem: string | null;
}

/**
 * What work that runs outside the service's database needs (a training's own process): the
 * store, the limits, a logger.
 */
export type StoreContext = Pick<ServiceContext, "store" | "limits" | "logger">;

/** Who is calling: resolved from the API key by the HTTP layer. */
export interface Principal {
  tenantId: string;
  apiKeyId: string;
}

/** The arguments of a service call made on behalf of a tenant. */
export interface TenantCall<Input = undefined> {
  ctx: ServiceContext;
  principal: Pick<Principal, "tenantId">;
  input: Input;
}

/** The arguments of a service call not scoped by a caller: authentication, bootstrap, or work on a resource already loaded for its tenant. */
export interface SystemCall<Input> {
  ctx: ServiceContext;
  input: Input;
}
