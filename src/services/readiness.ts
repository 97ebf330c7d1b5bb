import { sql } from "drizzle-orm";
import { activeBackend } from "../ml/backend.js";
import type { ServiceContext } from "./context.js";
import { UnavailableError } from "./errors.js";

/** Ready when the database answers a query and the object store answers a probe. */
export async function checkReadiness({ ctx }: { ctx: ServiceContext }) {
  try {
    await ctx.db.execute(sql`select 1`);
  } catch (err) {
    ctx.logger.warn("readiness: database unreachable", { error: err });
    throw new UnavailableError(`the ${ctx.databaseKind} database does not answer`);
  }
  try {
    await ctx.store.ping();
  } catch (err) {
    ctx.logger.warn("readiness: object store unreachable", { error: err });
    throw new UnavailableError(`the ${ctx.store.kind} object store does not answer`);
  }
  return {
    status: "ready" as const,
    database: ctx.databaseKind,
    store: ctx.store.kind,
    training_backend: activeBackend(),
  };
}
