import { randomUUID } from "node:crypto";
import { schema } from "../../src/db/client.js";
import type { ServiceContext } from "../../src/services/context.js";

/**
 * Registers `generations` generations of PAPA pulls over `width` checkpoints, as rows only (no
 * blobs): generation 0 has no parents, every checkpoint of generation g is
 * (1 - beta) x its own predecessor + beta x the mean of generation g - 1. Returns the ids by
 * generation. 30 generations of 4 make 4^30 paths from the last to the first.
 */
export async function registerPullChain(
  ctx: Pick<ServiceContext, "db">,
  tenantId: string,
  generations: number,
  width: number,
  beta: number,
): Promise<string[][]> {
  const ids = Array.from({ length: generations + 1 }, () =>
    Array.from({ length: width }, () => randomUUID()),
  );
  await ctx.db.insert(schema.checkpoints).values(
    ids.flat().map((id, i) => ({
      id,
      tenantId,
      name: `pull-${Math.floor(i / width)}-${i % width}`,
      sizeBytes: 8,
      sha256: "0".repeat(64),
      tensorCount: 0,
      parameterCount: 0,
      dtypes: [],
      storageKey: `nowhere/${id}`,
    })),
  );
  const edges = ids.slice(1).flatMap((children, g) =>
    children.flatMap((childId, j) =>
      (ids[g] ?? []).map((parentId, k) => ({
        parentId,
        childId,
        coefficient: beta / width + (j === k ? 1 - beta : 0),
        method: "papa-pull",
      })),
    ),
  );
  await ctx.db.insert(schema.lineageEdges).values(edges);
  return ids;
}
