import type { Hono } from "hono";
import { handle } from "hono/aws-lambda";
import { createApp } from "./app.js";
import { loadConfig } from "./config.js";
import type { AppEnv } from "./http/env.js";
import { openRuntime } from "./runtime.js";
import type { ServiceContext } from "./services/context.js";

/**
 * An AWS Lambda handler (API Gateway HTTP API v2, REST v1, ALB) serving the same app. The
 * context is built once per container, on the first invocation. Workers stay long-running
 * processes (`npm run start:worker`); a Lambda only serves requests.
 */
export function createLambdaHandler(context: () => Promise<ServiceContext>) {
  let app: Promise<Hono<AppEnv>> | null = null;
  return async (...args: Parameters<ReturnType<typeof handle>>) => {
    app ??= context().then(createApp);
    return handle(await app)(...args);
  };
}

export const handler = createLambdaHandler(async () => (await openRuntime(loadConfig())).ctx);
