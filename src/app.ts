import { Hono } from "hono";
import { methodNotAllowed } from "hono/method-not-allowed";
import type { AppEnv } from "./http/env.js";
import { requestContext } from "./http/middleware.js";
import { errorHandler, problemResponse } from "./http/problems.js";
import { apiKeyRoutes } from "./http/routes/api-keys.js";
import { checkpointRoutes, tfjsRoutes, uploadSessionRoutes } from "./http/routes/checkpoints.js";
import { datasetRoutes } from "./http/routes/datasets.js";
import { hfRoutes } from "./http/routes/hf.js";
import { jobRoutes } from "./http/routes/jobs.js";
import { lineageRoutes } from "./http/routes/lineage.js";
import { modelRoutes } from "./http/routes/models.js";
import { populationRoutes } from "./http/routes/populations.js";
import { serviceRoutes } from "./http/routes/service.js";
import type { ServiceContext } from "./services/context.js";

/** The HTTP API, composed from its dependencies; entry points only build those and serve it. */
export function createApp(ctx: ServiceContext): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  app.use(requestContext(ctx.logger));
  app.use(async (c, next) => {
    c.set("ctx", ctx);
    await next();
  });
  app.onError(errorHandler(ctx.logger));
  app.use(
    methodNotAllowed({
      app,
      onMethodNotAllowed: (c, methods) => {
        c.header("Allow", methods.join(", "));
        return problemResponse(c, 405, "method-not-allowed", `${c.req.path} takes ${methods.join(", ")}`);
      },
    }),
  );
  app.notFound((c) =>
    problemResponse(c, 404, "not-found", `no route for ${c.req.method} ${c.req.path}; see /openapi.yaml`),
  );
  serviceRoutes(app);
  apiKeyRoutes(app);
  checkpointRoutes(app);
  tfjsRoutes(app);
  uploadSessionRoutes(app);
  lineageRoutes(app);
  datasetRoutes(app);
  jobRoutes(app);
  populationRoutes(app);
  modelRoutes(app);
  hfRoutes(app);
  return app;
}
