import { schema } from "../../db/client.js";
import { newId } from "../../ids.js";
import type { SystemCall } from "../context.js";

export interface Tenant {
  id: string;
  name: string;
  createdAt: Date;
}

/** Creates a tenant. Tenants are made by operators (bootstrap, admin tooling), not over the API. */
export async function createTenant({ ctx, input }: SystemCall<{ name: string }>): Promise<Tenant> {
  const [row] = await ctx.db.insert(schema.tenants).values({ id: newId(), name: input.name }).returning();
  if (!row) throw new Error("tenant insert returned no row");
  return row;
}
