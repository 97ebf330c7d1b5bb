import { randomUUID } from "node:crypto";
import { schema } from "../../src/db/client.js";
import type { ServiceContext } from "../../src/services/context.js";

/**
 * Registers `count` checkpoints (each its own model's version 1) and the lineage edges between
 * them, as rows only (no blobs, no models rows):
 * `edges` are [child, parent, coefficient] by index. Returns the ids.
 */
export async function registerLineage(
  ctx: Pick<ServiceContext, "db">,
  tenantId: string,
  count: number,
  edges: [number, number, number][],
): Promise<string[]> {
  const ids = Array.from({ length: count }, () => randomUUID());
  await ctx.db.insert(schema.checkpoints).values(
    ids.map((id) => ({
      id,
      tenantId,
      name: `node-${id}`,
      version: 1,
      sizeBytes: 8,
      sha256: "0".repeat(64),
      tensorCount: 0,
      parameterCount: 0,
      dtypes: [],
      storageKey: `nowhere/${id}`,
    })),
  );
  if (edges.length > 0) {
    await ctx.db.insert(schema.lineageEdges).values(
      edges.map(([child, parent, coefficient]) => ({
        parentId: ids[parent] as string,
        childId: ids[child] as string,
        coefficient,
        method: "weighted",
      })),
    );
  }
  return ids;
}

/**
 * `generations` generations of PAPA pulls over `width` checkpoints: generation 0 has no parents,
 * every checkpoint of generation g is (1 - beta) x its own predecessor + beta x the mean of
 * generation g - 1. Returns the ids by generation. 30 generations of 4 make 4^30 paths from the
 * last to the first.
 */
export async function registerPullChain(
  ctx: Pick<ServiceContext, "db">,
  tenantId: string,
  generations: number,
  width: number,
  beta: number,
): Promise<string[][]> {
  const index = (g: number, j: number) => g * width + j;
  const edges: [number, number, number][] = [];
  for (let g = 1; g <= generations; g++)
    for (let j = 0; j < width; j++)
      for (let k = 0; k < width; k++)
        edges.push([index(g, j), index(g - 1, k), beta / width + (j === k ? 1 - beta : 0)]);
  const ids = await registerLineage(ctx, tenantId, (generations + 1) * width, edges);
  return Array.from({ length: generations + 1 }, (_, g) => ids.slice(g * width, (g + 1) * width));
}
