import { ConfigError } from "../config.js";
import { createJsonLogger } from "../logger.js";
import { openRuntime } from "../runtime.js";
import { loadConfigWithSecrets } from "../secrets.js";
import { createTenantWithKey } from "../services/api-keys/api-keys.js";
import { CliFailure } from "./remote.js";

/**
 * `papa admin create-tenant NAME`: creates a tenant and its first API key in the service's
 * database (configured as the server is), and returns them; the key is shown this once.
 */
export async function createTenant(name: string): Promise<object> {
  const config = await loadConfigWithSecrets().catch((err: unknown) => {
    throw err instanceof ConfigError ? new CliFailure(err.message) : err;
  });
  const runtime = await openRuntime(
    config,
    createJsonLogger("warn", (line) => process.stderr.write(line)),
  );
  try {
    const { tenantId, apiKey, secret } = await createTenantWithKey({ ctx: runtime.ctx, input: { name } });
    return { tenant_id: tenantId, name, api_key_id: apiKey.id, api_key: secret };
  } finally {
    await runtime.close();
  }
}
