import { type SQL, sql } from "drizzle-orm";

/**
 * Text with `$1`-style placeholders as a drizzle SQL object, so SQL written for node-postgres
 * (pg-boss's) can run inside a drizzle transaction.
 */
export function positionalSql(text: string, values: unknown[]): SQL {
  const parts = text.split(/\$(\d+)/);
  // drizzle renders an undefined parameter as nothing at all; SQL means null.
  const chunks: SQL[] = parts.map((part, i) =>
    i % 2 === 0 ? sql.raw(part) : sql`${values[Number(part) - 1] ?? null}`,
  );
  return sql.join(chunks);
}
