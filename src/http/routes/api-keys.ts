import type { Hono } from "hono";
import { createApiKey, listApiKeys, revokeApiKey } from "../../services/api-keys/api-keys.js";
import type { AppEnv } from "../env.js";
import { operation } from "../openapi.js";
import { apiKeyBody } from "../presenters.js";

export function apiKeyRoutes(app: Hono<AppEnv>): void {
  operation(app, "createApiKey", async (c, req) => {
    const { apiKey, secret } = await createApiKey({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { name: req.body?.name },
    });
    c.header("Cache-Control", "no-store");
    return c.json({ ...apiKeyBody(apiKey), key: secret }, 201);
  });

  operation(app, "listApiKeys", async (c) => {
    const keys = await listApiKeys({ ctx: c.get("ctx"), principal: c.get("principal") });
    return c.json({ items: keys.map(apiKeyBody) });
  });

  operation(app, "revokeApiKey", async (c, req) => {
    await revokeApiKey({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path });
    return c.body(null, 204);
  });
}
