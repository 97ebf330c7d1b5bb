import type { Hono } from "hono";
import { recordMetric } from "../../services/checkpoints/checkpoints.js";
import { getLineage } from "../../services/lineage/lineage.js";
import type { AppEnv } from "../env.js";
import { operation } from "../openapi.js";
import { lineageBody, metricBody } from "../presenters.js";

export function lineageRoutes(app: Hono<AppEnv>): void {
  operation(app, "getCheckpointLineage", async (c, req) => {
    const direction = req.query?.direction ?? "ancestors";
    const depth = req.query?.depth ?? 20;
    const lineage = await getLineage({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { id: req.path.id, direction, depth },
    });
    return c.json(lineageBody(req.path.id, direction, depth, lineage));
  });

  operation(app, "createCheckpointMetric", async (c, req) => {
    const metric = await recordMetric({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { checkpointId: req.path.id, ...req.body },
    });
    return c.json(metricBody(metric), 201);
  });
}
