import { GetSecretValueCommand, SecretsManagerClient } from "@aws-sdk/client-secrets-manager";
import { type Config, ConfigError, loadConfig } from "./config.js";

type Env = Record<string, string | undefined>;

/**
 * Reads the configuration like `loadConfig`, first filling two variables from AWS Secrets Manager
 * so that no secret sits in a function's or a task's environment:
 * - `DATABASE_SECRET_ARN`: a secret in the form RDS writes (`username`, `password`, `host`,
 *   `port`, `dbname`), giving `DATABASE_URL`; with `DATABASE_CA_FILE` (a PEM bundle, such as RDS's
 *   global bundle) the connection is TLS, verified against it;
 * - `PAPA_API_KEY_SECRET_ARN`: a plain string secret, giving `PAPA_API_KEY`.
 * Each excludes the variable it fills. Without either, no AWS call is made.
 */
export async function loadConfigWithSecrets(
  env: Env = process.env,
  client: () => SecretsManagerClient = () => new SecretsManagerClient({}),
): Promise<Config> {
  const filled: Env = { ...env };
  let sm: SecretsManagerClient | undefined;
  const readSecret = async (variable: string, filledVariable: string): Promise<string | undefined> => {
    const arn = env[variable];
    if (!arn) return undefined;
    if (env[filledVariable])
      throw new ConfigError(`invalid configuration: set ${variable} or ${filledVariable}, not both`);
    sm ??= client();
    try {
      const { SecretString } = await sm.send(new GetSecretValueCommand({ SecretId: arn }));
      if (!SecretString) throw new Error("the secret has no string value");
      return SecretString;
    } catch (error) {
      throw new ConfigError(
        `invalid configuration: ${variable}: cannot read ${arn}: ${(error as Error).message}`,
      );
    }
  };
  try {
    const database = await readSecret("DATABASE_SECRET_ARN", "DATABASE_URL");
    if (database !== undefined) filled.DATABASE_URL = databaseUrl(database, env.DATABASE_CA_FILE);
    const apiKey = await readSecret("PAPA_API_KEY_SECRET_ARN", "PAPA_API_KEY");
    if (apiKey !== undefined) filled.PAPA_API_KEY = apiKey;
  } finally {
    sm?.destroy();
  }
  return loadConfig(filled);
}

function databaseUrl(secret: string, caFile: string | undefined): string {
  let fields: Record<string, unknown>;
  try {
    fields = JSON.parse(secret);
  } catch {
    throw new ConfigError("invalid configuration: DATABASE_SECRET_ARN: the secret is not JSON");
  }
  const { username, password, host, port, dbname } = fields;
  if (typeof username !== "string" || typeof password !== "string" || typeof host !== "string") {
    throw new ConfigError(
      "invalid configuration: DATABASE_SECRET_ARN: the secret needs string fields username, password and host",
    );
  }
  const e = encodeURIComponent;
  const database = typeof dbname === "string" ? dbname : "postgres";
  const tls = caFile ? `?sslmode=verify-full&sslrootcert=${e(caFile)}` : "";
  return `postgres://${e(username)}:${e(password)}@${host}:${Number(port ?? 5432)}/${e(database)}${tls}`;
}
