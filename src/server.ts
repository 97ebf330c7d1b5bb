#!/usr/bin/env node
import { serve } from "@hono/node-server";
import { createApp } from "./app.js";
import { ConfigError, loadConfig } from "./config.js";
import { createJsonLogger } from "./logger.js";
import { openRuntime } from "./runtime.js";
import { bootstrapApiKey } from "./services/api-keys/api-keys.js";

async function main(): Promise<void> {
  const config = loadConfig();
  const logger = createJsonLogger(config.logLevel);
  const runtime = await openRuntime(config, logger);
  const { createdSecret } = await bootstrapApiKey({
    ctx: runtime.ctx,
    input: { configuredKey: config.bootstrapApiKey },
  });
  if (createdSecret) {
    // Printed once, outside the JSON log stream, so log shippers do not collect it.
    process.stderr.write(
      `\nNo API key existed, so one was created. It is shown only now; keep it:\n\n  ${createdSecret}\n\n`,
    );
  }
  const server = serve(
    {
      fetch: createApp(runtime.ctx).fetch,
      port: config.port,
      hostname: config.host,
      serverOptions: { maxHeaderSize: config.limits.maxHttpHeaderBytes, requestTimeout: 0 },
    },
    (info) => {
      logger.info("listening", {
        url: `http://${config.host === "0.0.0.0" ? "127.0.0.1" : config.host}:${info.port}`,
        database: runtime.ctx.databaseKind,
        store: runtime.ctx.store.kind,
      });
    },
  );
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info("stopping", { signal });
    server.close(() => {
      runtime.close().then(
        () => process.exit(0),
        (err: unknown) => {
          logger.error("shutdown failed", { error: err });
          process.exit(1);
        },
      );
    });
    setTimeout(() => process.exit(1), 10_000).unref();
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
}

main().catch((err: unknown) => {
  process.stderr.write(
    `${err instanceof ConfigError ? err.message : ((err as Error).stack ?? String(err))}\n`,
  );
  process.exit(1);
});
