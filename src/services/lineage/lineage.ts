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

export interface Contribution {
  checkpointId: string;
  /** The sum over paths from it to the checkpoint of the products of the coefficients. */
  weight: number;
  /** A checkpoint with no parents; false for one the walk stopped at (the depth limit). */
  root: boolean;
}

export interface Lineage {
  nodes: LineageNode[];
  edges: LineageEdge[];
  /** Ancestors only: the weight in the checkpoint of every node the walk ends at (`contributions`). */
  contributions: Contribution[];
}

function rowsOf<T>(result: unknown): T[] {
  return (result as { rows: T[] }).rows;
}

/**
 * Each source of an ancestor walk (a node without parent edges among `edges`: a root, or where
 * the walk stopped) and its weight in `start`, in one pass over the DAG, linear in nodes plus
 * edges: a node's weight, once all its children within the walk have added theirs, is passed to
 * its parents times each edge's coefficient (Kahn's order, children first). Where every child's
 * coefficients sum to 1, so do the weights: a walk cut at its depth is stated relative to its
 * frontier.
 */
export function contributionsOf(
  start: string,
  edges: { parentId: string; childId: string; coefficient: number }[],
): Omit<Contribution, "root">[] {
  const parentsOf = new Map<string, { parentId: string; coefficient: number }[]>();
  const pendingChildren = new Map<string, number>();
  for (const e of edges) {
    parentsOf.set(e.childId, [...(parentsOf.get(e.childId) ?? []), e]);
    pendingChildren.set(e.parentId, (pendingChildren.get(e.parentId) ?? 0) + 1);
  }
  const weight = new Map<string, number>([[start, 1]]);
  const ready = [start];
  const sources: Omit<Contribution, "root">[] = [];
  for (let node = ready.pop(); node !== undefined; node = ready.pop()) {
    const w = weight.get(node) ?? 0;
    const parents = parentsOf.get(node);
    if (!parents) {
      sources.push({ checkpointId: node, weight: w });
      continue;
    }
    for (const { parentId, coefficient } of parents) {
      weight.set(parentId, (weight.get(parentId) ?? 0) + w * coefficient);
      const left = (pendingChildren.get(parentId) ?? 0) - 1;
      pendingChildren.set(parentId, left);
      if (left === 0) ready.push(parentId);
    }
  }
  return sources.sort((a, b) => a.checkpointId.localeCompare(b.checkpointId));
}

/**
 * The lineage graph around a checkpoint, walked in SQL with a recursive query: nodes with their
 * metrics and distance, the edges among them, and for ancestors the effective contribution of
 * every root, or of every node where the walk stopped (`contributionsOf`).
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
  // A node at the depth limit is on the frontier: its parents were not all walked, even where
  // some were (reached by a shorter path), so none of its edges carry its weight on.
  const inside = edges.filter((e) => (depthOf.get(e.childId) ?? 0) < depth);
  const sources = ancestors ? contributionsOf(id, inside) : [];
  const withParents = new Set(
    sources.length === 0
      ? []
      : (
          await ctx.db
            .selectDistinct({ id: schema.lineageEdges.childId })
            .from(schema.lineageEdges)
            .where(
              inArray(
                schema.lineageEdges.childId,
                sources.map((c) => c.checkpointId),
              ),
            )
        ).map((r) => r.id),
  );
  const contributions = sources.map((c) => ({ ...c, root: !withParents.has(c.checkpointId) }));
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
