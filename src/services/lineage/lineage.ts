import { and, inArray, sql } from "drizzle-orm";
import { schema } from "../../db/client.js";
import { getCheckpoint, type Metric, metricsOf } from "../checkpoints/checkpoints.js";
import type { TenantCall } from "../context.js";

export interface LineageNode {
  id: string;
  name: string;
  deleted: boolean;
  jobId: string | null;
  createdAt: Date;
  depth: number;
  metrics: Metric[];
}

export interface LineageEdge {
  parentId: string;
  childId: string;
  coefficient: number;
  method: string;
  jobId: string | null;
}

export interface Lineage {
  nodes: LineageNode[];
  edges: LineageEdge[];
  /** Ancestors only: each root's weight in the checkpoint (sum over paths of coefficient products). */
  contributions: { checkpointId: string; weight: number }[];
}

function rowsOf<T>(result: unknown): T[] {
  return (result as { rows: T[] }).rows;
}

/**
 * The lineage graph around a checkpoint, walked in SQL with recursive queries: nodes with their
 * metrics and distance, the edges among them, and for ancestors the effective contribution of
 * every root (how much of checkpoint X is in this model).
 */
export async function getLineage({
  ctx,
  principal,
  input,
}: TenantCall<{ id: string; direction: "ancestors" | "descendants"; depth: number }>): Promise<Lineage> {
  const { id, direction, depth } = input;
  await getCheckpoint({ ctx, principal, input: { id } });
  const ancestors = direction === "ancestors";
  const next = ancestors ? sql.raw("e.parent_id") : sql.raw("e.child_id");
  const from = ancestors ? sql.raw("e.child_id") : sql.raw("e.parent_id");
  const walked = rowsOf<{ id: string; depth: number }>(
    await ctx.db.execute(sql`
      with recursive walk(id, depth) as (
        select ${id}::uuid, 0
        union
        select ${next}, w.depth + 1 from walk w join lineage_edges e on ${from} = w.id where w.depth < ${depth}
      )
      select id, min(depth)::int as depth from walk group by id`),
  );
  const ids = walked.map((w) => w.id);
  const depthOf = new Map(walked.map((w) => [w.id, Number(w.depth)]));
  const [rows, edges, metrics] = await Promise.all([
    ctx.db.select().from(schema.checkpoints).where(inArray(schema.checkpoints.id, ids)),
    ctx.db
      .select()
      .from(schema.lineageEdges)
      .where(and(inArray(schema.lineageEdges.parentId, ids), inArray(schema.lineageEdges.childId, ids))),
    metricsOf(ctx, ids),
  ]);
  const contributions = ancestors
    ? rowsOf<{ id: string; weight: number }>(
        await ctx.db.execute(sql`
          with recursive paths(id, weight, depth) as (
            select ${id}::uuid, 1::float8, 0
            union all
            select e.parent_id, p.weight * e.coefficient, p.depth + 1
            from paths p join lineage_edges e on e.child_id = p.id where p.depth < ${depth}
          )
          select p.id, sum(p.weight)::float8 as weight from paths p
          where not exists (select 1 from lineage_edges e where e.child_id = p.id)
          group by p.id order by p.id`),
      ).map((r) => ({ checkpointId: r.id, weight: Number(r.weight) }))
    : [];
  return {
    nodes: rows
      .map((r) => ({
        id: r.id,
        name: r.name,
        deleted: r.deletedAt !== null,
        jobId: r.jobId,
        createdAt: r.createdAt,
        depth: depthOf.get(r.id) ?? 0,
        metrics: metrics.get(r.id) ?? [],
      }))
      .sort((a, b) => a.depth - b.depth || a.id.localeCompare(b.id)),
    edges: edges
      .map((e) => ({
        parentId: e.parentId,
        childId: e.childId,
        coefficient: e.coefficient,
        method: e.method,
        jobId: e.jobId,
      }))
      .sort((a, b) => a.childId.localeCompare(b.childId) || a.parentId.localeCompare(b.parentId)),
    contributions,
  };
}
