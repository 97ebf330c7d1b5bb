import { randomUUID } from "node:crypto";
import type { MiddlewareHandler } from "hono";
import type { Logger } from "../logger.js";
import type { AppEnv } from "./env.js";

const CLIENT_REQUEST_ID = /^[A-Za-z0-9._-]{1,128}$/;

/**
 * Gives every request an id (the client's `X-Request-Id` when it is a plain token), echoes it,
 * and logs one JSON line when the response is ready: method, path (no query string), status,
 * duration, tenant. Headers and bodies are never logged, so keys cannot leak into logs.
 */
export function requestContext(logger: Logger): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const started = performance.now();
    const inbound = c.req.header("x-request-id");
    const requestId = inbound && CLIENT_REQUEST_ID.test(inbound) ? inbound : randomUUID();
    c.set("requestId", requestId);
    c.header("X-Request-Id", requestId);
    await next();
    logger.info("request", {
      request_id: requestId,
      method: c.req.method,
      path: c.req.path,
      status: c.res.status,
      duration_ms: Math.round((performance.now() - started) * 10) / 10,
      tenant_id: c.get("principal")?.tenantId ?? null,
    });
  };
}
