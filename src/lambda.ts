import type { Hono } from "hono";
import { handle } from "hono/aws-lambda";
import { createApp } from "./app.js";
import type { AppEnv } from "./http/env.js";
import { ensureApiKey, openRuntime } from "./runtime.js";
import { loadConfigWithSecrets } from "./secrets.js";
import type { ServiceContext } from "./services/context.js";

/**
 * An AWS Lambda handler (API Gateway HTTP API v2, REST v1, ALB) serving the same app. The
 * context is built once per container, on the first invocation. Workers stay long-running
 * processes (`npm run start:worker`); a Lambda only serves requests.
 */
export function createLambdaHandler(context: () => Promise<ServiceContext>) {
  let app: Promise<Hono<AppEnv>> | null = null;
  return async (...args: Parameters<ReturnType<typeof handle>>) => {
    // A failed start (database unreachable, say) is retried by the next invocation.
    app ??= context()
      .then(createApp)
      .catch((error: unknown) => {
        app = null;
        throw error;
      });
    return handle(await app)(...args);
  };
}

/** The deployed handler: configuration from the environment and Secrets Manager (see `loadConfigWithSecrets`). */
export const handler = createLambdaHandler(async () => {
  const config = await loadConfigWithSecrets();
  const { ctx } = await openRuntime(config);
  await ensureApiKey(ctx, config.bootstrapApiKey);
  return ctx;
});
