import type { MiddlewareHandler } from "hono";
import { authenticateApiKey } from "../services/api-keys/api-keys.js";
import type { AppEnv } from "./env.js";
import { HttpProblem } from "./problems.js";

/** Resolves `Authorization: Bearer <key>` to the caller's tenant; 401 otherwise. */
export const authenticate: MiddlewareHandler<AppEnv> = async (c, next) => {
  const header = c.req.header("authorization");
  const match = header?.match(/^Bearer\s+(\S+)\s*$/i);
  if (!match?.[1]) {
    throw new HttpProblem(
      401,
      "unauthenticated",
      "this operation needs an 'Authorization: Bearer <key>' header",
    );
  }
  c.set("principal", await authenticateApiKey({ ctx: c.get("ctx"), input: { secret: match[1] } }));
  await next();
};
