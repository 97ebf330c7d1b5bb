import type { Limits } from "../config.js";
import type { Database } from "../db/client.js";
import type { JobQueue } from "../jobs/queue.js";
import type { Logger } from "../logger.js";
import type { ObjectStore } from "../storage/object-store.js";

/** Everything a service needs, built once at start and passed in. */
export interface ServiceContext {
  db: Database;
  databaseKind: "postgres" | "pglite";
  store: ObjectStore;
  queue: JobQueue;
  limits: Limits;
  presignExpiresSeconds: number;
  logger: Logger;
}

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
