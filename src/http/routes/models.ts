import type { Hono } from "hono";
import {
  deleteModelAlias,
  getModel,
  listModels,
  resolveModelVersion,
  setModelAlias,
} from "../../services/models/models.js";
import type { AppEnv } from "../env.js";
import { operation } from "../openapi.js";
import { aliasBody, checkpointBody, modelSummaryBody } from "../presenters.js";
import { serveCheckpointFile } from "./checkpoints.js";

export function modelRoutes(app: Hono<AppEnv>): void {
  operation(app, "listModels", async (c, req) => {
    const page = await listModels({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { limit: req.query?.limit ?? 50, cursor: req.query?.cursor, namePrefix: req.query?.name_prefix },
    });
    return c.json({ items: page.items.map(modelSummaryBody), next_cursor: page.nextCursor });
  });

  operation(app, "getModel", async (c, req) => {
    const model = await getModel({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { name: req.path.name, limit: req.query?.limit ?? 50, cursor: req.query?.cursor },
    });
    return c.json({
      ...modelSummaryBody(model),
      aliases: model.aliases.map(aliasBody),
      versions: model.versions.items.map(checkpointBody),
      next_cursor: model.versions.nextCursor,
    });
  });

  operation(app, "setModelAlias", async (c, req) => {
    const alias = await setModelAlias({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { ...req.path, version: req.body.version },
    });
    return c.json(aliasBody(alias));
  });

  operation(app, "deleteModelAlias", async (c, req) => {
    await deleteModelAlias({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path });
    return c.body(null, 204);
  });

  operation(app, "getModelFile", async (c, req) => {
    const checkpoint = await resolveModelVersion({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { name: req.path.name, ref: req.path.version },
    });
    return serveCheckpointFile(c, checkpoint, req.path.filename, req.query?.redirect ?? false);
  });
}
