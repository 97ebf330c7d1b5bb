import type { Hono } from "hono";
import { checkReadiness } from "../../services/readiness.js";
import { DOCS_ASSETS, DOCS_PAGE, docsAsset } from "../docs.js";
import type { AppEnv } from "../env.js";
import { openApiText, operation } from "../openapi.js";

export function serviceRoutes(app: Hono<AppEnv>): void {
  operation(app, "getHealth", (c) => c.json({ status: "ok" as const }));

  operation(app, "getReadiness", async (c) => c.json(await checkReadiness({ ctx: c.get("ctx") })));

  operation(app, "getDocs", (c) => c.html(DOCS_PAGE));

  operation(app, "getDocsAsset", async (c, req) => {
    const asset = req.path.asset;
    return c.body(await docsAsset(asset), 200, {
      "Content-Type": DOCS_ASSETS[asset],
      "Cache-Control": "public, max-age=3600",
    });
  });

  operation(app, "getOpenApiDocument", (c) =>
    c.body(openApiText, 200, { "Content-Type": "application/yaml; charset=utf-8" }),
  );
}
