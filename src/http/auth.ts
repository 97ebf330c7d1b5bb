import type { MiddlewareHandler } from "hono";
import { authenticateApiKey } from "../services/api-keys/api-keys.js";
import { UnauthenticatedError } from "../services/errors.js";
import type { AppEnv } from "./env.js";
import { clientAddress } from "./incoming.js";
import { HttpProblem } from "./problems.js";

/**
 * Resolves `Authorization: Bearer <key>` to the caller's tenant; 401 otherwise. Requests with a
 * wrong key count against the client's address, which is shut out (429) past its allowance; each
 * request with a right one counts against the key's rate (429 beyond).
 */
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
  const ctx = c.get("ctx");
  const address = clientAddress(c);
  if (address) await ctx.rateLimits.assertNotShutOut(address);
  try {
    c.set("principal", await authenticateApiKey({ ctx, input: { secret: match[1] } }));
  } catch (err) {
    if (address && err instanceof UnauthenticatedError) await ctx.rateLimits.countAuthFailure(address);
    throw err;
  }
  await ctx.rateLimits.countRequest(c.get("principal").apiKeyId);
  await next();
};
