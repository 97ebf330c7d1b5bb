import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../src/config.js";

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
        maxHttpHeaderBytes: 16384,
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
  ])("rejects %j naming %s", (env, variable) => {
    expect(() => loadConfig(env)).toThrow(ConfigError);
    expect(() => loadConfig(env)).toThrow(variable);
  });
});
