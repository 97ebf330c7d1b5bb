import { sql } from "drizzle-orm";
import type { ServiceContext } from "./context.js";
import { UnavailableError } from "./errors.js";

/**
 * Ready when the database answers a query, the object store answers a probe, and the training
 * backend (where this process trains) passed its probe.
 */
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
  if (ctx.trainer.problem) {
    throw new UnavailableError(`the training backend cannot run: ${ctx.trainer.problem}`);
  }
  return {
    status: "ready" as const,
    database: ctx.databaseKind,
    store: ctx.store.kind,
    training_backend: ctx.trainer.backend,
  };
}
