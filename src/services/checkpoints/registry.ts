import { and, eq, inArray, notInArray, or, sql } from "drizzle-orm";
import { type Database, schema } from "../../db/client.js";

export type NewCheckpoint = Omit<typeof schema.checkpoints.$inferInsert, "version">;
export type NewMetric = Omit<typeof schema.metrics.$inferInsert, "current">;

/**
 * Registers checkpoints as the next versions of their models (their names), in the order
 * given, creating a model at its first version, and returns the rows it wrote. Rows whose id is
 * registered already (a retried job's outputs) are left as they were. Run it in the transaction that writes the rest of the
 * registration: the model's row stays locked until it commits, so versions are never shared.
 */
export async function insertCheckpoints(
  tx: Database,
  rows: NewCheckpoint[],
): Promise<(typeof schema.checkpoints.$inferSelect)[]> {
  const c = schema.checkpoints;
  const known = new Set(
    rows.length === 0
      ? []
      : (
          await tx
            .select({ id: c.id })
            .from(c)
            .where(
              inArray(
                c.id,
                rows.map((row) => row.id),
              ),
            )
        ).map((row) => row.id),
  );
  const fresh = rows.filter((row) => !known.has(row.id));
  const byModel = new Map<string, NewCheckpoint[]>();
  for (const row of fresh) {
    const model = JSON.stringify([row.tenantId, row.name]);
    byModel.set(model, [...(byModel.get(model) ?? []), row]);
  }
  const versioned: (typeof c.$inferInsert)[] = [];
  for (const versions of byModel.values()) {
    const { tenantId, name } = versions[0] as NewCheckpoint;
    const count = versions.length;
    const [model] = await tx
      .insert(schema.models)
      .values({ tenantId, name, latestVersion: count })
      .onConflictDoUpdate({
        target: [schema.models.tenantId, schema.models.name],
        set: { latestVersion: sql`${schema.models.latestVersion} + ${count}` },
      })
      .returning({ latestVersion: schema.models.latestVersion });
    if (!model) throw new Error(`model ${name} was not registered`);
    const first = model.latestVersion - count + 1;
    versioned.push(...versions.map((row, i) => ({ ...row, version: first + i })));
  }
  return versioned.length === 0 ? [] : tx.insert(c).values(versioned).onConflictDoNothing().returning();
}

/**
 * Records metric values; each becomes its checkpoint's current value of its (dataset, split,
 * name), the one searches use, and the value it replaces stays in the history. Rows whose id is
 * recorded already (a retried job's) change nothing. Run it in a transaction.
 */
export async function insertMetrics(
  tx: Database,
  rows: NewMetric[],
): Promise<(typeof schema.metrics.$inferSelect)[]> {
  if (rows.length === 0) return [];
  const m = schema.metrics;
  await tx
    .update(m)
    .set({ current: false })
    .where(
      and(
        eq(m.current, true),
        notInArray(
          m.id,
          rows.map((row) => row.id),
        ),
        or(
          ...rows.map((row) =>
            and(
              eq(m.checkpointId, row.checkpointId),
              eq(m.dataset, row.dataset),
              eq(m.split, row.split),
              eq(m.name, row.name),
            ),
          ),
        ),
      ),
    );
  return tx.insert(m).values(rows).onConflictDoNothing().returning();
}
