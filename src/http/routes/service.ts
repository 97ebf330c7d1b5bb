import type { Hono } from "hono";
import { OPENAPI_DOCUMENT } from "../../generated/openapi-document.js";
import { checkReadiness } from "../../services/readiness.js";
import { renderDocs } from "../docs.js";
import type { AppEnv } from "../env.js";
import { openApiText, operation } from "../openapi.js";

export function serviceRoutes(app: Hono<AppEnv>): void {
  operation(app, "getHealth", (c) => c.json({ status: "ok" as const }));

  operation(app, "getReadiness", async (c) => c.json(await checkReadiness({ ctx: c.get("ctx") })));

  // Rendered at the first request for it, not at start.
  let docs: string | undefined;
  operation(app, "getDocs", (c) => {
    docs ??= renderDocs(OPENAPI_DOCUMENT);
    return c.html(docs);
  });

  operation(app, "getOpenApiDocument", (c) =>
    c.body(openApiText, 200, { "Content-Type": "application/yaml; charset=utf-8" }),
  );
}
