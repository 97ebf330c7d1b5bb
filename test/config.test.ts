import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SecretsManagerClient } from "@aws-sdk/client-secrets-manager";
import { parse } from "pg-connection-string";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../src/config.js";
import { loadConfigWithSecrets } from "../src/secrets.js";

describe("configuration", () => {
  it("defaults to the embedded setup", () => {
    const config = loadConfig({});
    expect(config).toMatchObject({
      port: 8080,
      dataDir: "./.papa",
      databaseUrl: undefined,
      s3: undefined,
      bootstrapApiKey: undefined,
      limits: {
        maxUploadBytes: 20 * 1024 ** 3,
        maxSafetensorsHeaderBytes: 25_000_000,
        maxJsonBodyBytes: 1024 ** 2,
        maxMergeHeaderBytes: 64 * 1024 ** 2,
      },
      http: {
        maxHeaderBytes: 16384,
        headersTimeoutSeconds: 20,
        idleTimeoutSeconds: 60,
        maxConnections: 10_000,
        maxConnectionsPerClient: 256,
      },
    });
  });

  it("reads Postgres and S3 settings", () => {
    const config = loadConfig({
      DATABASE_URL: "postgres://u@db:5432/papa",
      S3_BUCKET: "weights",
      S3_REGION: "eu-west-1",
      S3_ENDPOINT: "http://minio:9000",
      S3_FORCE_PATH_STYLE: "true",
      S3_ACCESS_KEY_ID: "id",
      S3_SECRET_ACCESS_KEY: "secret",
      PAPA_MAX_UPLOAD_BYTES: "1000",
    });
    expect(config.databaseUrl).toBe("postgres://u@db:5432/papa");
    expect(config.s3).toEqual({
      bucket: "weights",
      region: "eu-west-1",
      endpoint: "http://minio:9000",
      forcePathStyle: true,
      credentials: { accessKeyId: "id", secretAccessKey: "secret" },
    });
    expect(config.limits.maxUploadBytes).toBe(1000);
  });

  it.each([
    [{ PORT: "eighty" }, "PORT"],
    [{ PORT: "70000" }, "PORT"],
    [{ DATABASE_URL: "mysql://x" }, "DATABASE_URL"],
    [{ PAPA_API_KEY: "short" }, "PAPA_API_KEY"],
    [{ S3_BUCKET: "b", S3_FORCE_PATH_STYLE: "yes" }, "S3_FORCE_PATH_STYLE"],
    [{ S3_ENDPOINT: "http://minio:9000" }, "S3_BUCKET"],
    [{ S3_BUCKET: "bucket", S3_ACCESS_KEY_ID: "id" }, "S3_SECRET_ACCESS_KEY"],
    [{ PAPA_MAX_UPLOAD_BYTES: "-1" }, "PAPA_MAX_UPLOAD_BYTES"],
    [{ PAPA_MAX_SAFETENSORS_HEADER_BYTES: "1.5" }, "PAPA_MAX_SAFETENSORS_HEADER_BYTES"],
    [{ PAPA_DATASETS: "mnist,cifar-100" }, "PAPA_DATASETS"],
  ])("rejects %j naming %s", (env, variable) => {
    expect(() => loadConfig(env)).toThrow(ConfigError);
    expect(() => loadConfig(env)).toThrow(variable);
  });
});

describe("configuration from AWS Secrets Manager", () => {
  // A local endpoint speaking Secrets Manager's JSON protocol (GetSecretValue only).
  const secrets = new Map<string, string>();
  const requests: { target: string | undefined; secretId: string }[] = [];
  let endpoint = "";
  const server = createServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => {
      body += chunk;
    });
    req.on("end", () => {
      const { SecretId } = JSON.parse(body) as { SecretId: string };
      requests.push({ target: req.headers["x-amz-target"] as string | undefined, secretId: SecretId });
      const value = secrets.get(SecretId);
      res.writeHead(value === undefined ? 400 : 200, { "content-type": "application/x-amz-json-1.1" });
      res.end(
        JSON.stringify(
          value === undefined
            ? {
                __type: "ResourceNotFoundException",
                message: "Secrets Manager can't find the specified secret.",
              }
            : { ARN: SecretId, Name: "s", SecretString: value },
        ),
      );
    });
  });
  const client = () =>
    new SecretsManagerClient({
      endpoint,
      region: "us-east-1",
      credentials: { accessKeyId: "test", secretAccessKey: "test" },
    });
  const dbArn = "arn:aws:secretsmanager:us-east-1:1:secret:db";
  const keyArn = "arn:aws:secretsmanager:us-east-1:1:secret:key";

  beforeAll(async () => {
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    secrets.set(
      dbArn,
      JSON.stringify({
        username: "papa",
        password: "p@ss/word",
        host: "db.internal",
        port: 5433,
        dbname: "papa",
      }),
    );
    secrets.set(keyArn, "papa_a-key-from-secrets-manager-0123456789");
  });
  afterAll(() => new Promise((resolve) => server.close(resolve)));

  it("fills DATABASE_URL and PAPA_API_KEY from their secrets", async () => {
    requests.length = 0;
    const config = await loadConfigWithSecrets(
      { DATABASE_SECRET_ARN: dbArn, PAPA_API_KEY_SECRET_ARN: keyArn, S3_BUCKET: "weights" },
      client,
    );
    expect(config.databaseUrl).toBe("postgres://papa:p%40ss%2Fword@db.internal:5433/papa");
    expect(parse(config.databaseUrl ?? "")).toMatchObject({ user: "papa", password: "p@ss/word" });
    expect(config.bootstrapApiKey).toBe("papa_a-key-from-secrets-manager-0123456789");
    expect(config.s3?.bucket).toBe("weights");
    expect(requests).toEqual([
      { target: "secretsmanager.GetSecretValue", secretId: dbArn },
      { target: "secretsmanager.GetSecretValue", secretId: keyArn },
    ]);
  });

  it("verifies the database's certificate against DATABASE_CA_FILE", async () => {
    const dir = mkdtempSync(join(tmpdir(), "papa-ca-"));
    const caFile = join(dir, "rds bundle.pem");
    writeFileSync(caFile, "-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n");
    const config = await loadConfigWithSecrets(
      { DATABASE_SECRET_ARN: dbArn, DATABASE_CA_FILE: caFile },
      client,
    );
    const ssl = parse(config.databaseUrl ?? "").ssl as { ca?: string; rejectUnauthorized?: boolean };
    expect(ssl.ca).toContain("not checked here");
    expect(ssl.rejectUnauthorized).not.toBe(false);
  });

  it("makes no AWS call without a secret variable", async () => {
    requests.length = 0;
    const config = await loadConfigWithSecrets({ DATABASE_URL: "postgres://u@db/papa" }, () => {
      throw new Error("no client expected");
    });
    expect(config.databaseUrl).toBe("postgres://u@db/papa");
    expect(requests).toEqual([]);
  });

  it.each([
    [{ DATABASE_SECRET_ARN: "arn:aws:secretsmanager:us-east-1:1:secret:missing" }, "can't find"],
    [{ DATABASE_SECRET_ARN: keyArn }, "not JSON"],
    [{ DATABASE_SECRET_ARN: dbArn, DATABASE_URL: "postgres://u@db/papa" }, "not both"],
    [{ PAPA_API_KEY_SECRET_ARN: keyArn, PAPA_API_KEY: "x".repeat(30) }, "not both"],
  ])("rejects %j clearly", async (env, message) => {
    const failure = loadConfigWithSecrets(env, client);
    await expect(failure).rejects.toThrow(ConfigError);
    await expect(loadConfigWithSecrets(env, client)).rejects.toThrow(message);
  });
});
