import type { Principal, ServiceContext } from "../services/context.js";

/** Hono variables: built once per app (`ctx`) or per request (the rest). */
export interface AppEnv {
  Variables: {
    ctx: ServiceContext;
    requestId: string;
    /** Set by the auth middleware on operations that require a key. */
    principal: Principal;
    /** The request, validated against openapi.yaml; read it through `operation()` handlers. */
    validated: unknown;
  };
}
