#!/usr/bin/env node
import { serve } from "@hono/node-server";
import { createApp } from "./app.js";
import { startWorker } from "./jobs/worker.js";
import { exitOnStartupError, stopOnSignals } from "./lifecycle.js";
import { createJsonLogger } from "./logger.js";
import { ensureApiKey, openRuntime } from "./runtime.js";
import { loadConfigWithSecrets } from "./secrets.js";

/** The API server; with the embedded default (PAPA_IN_PROCESS_WORKER) also a worker. */
async function main(): Promise<void> {
  const config = await loadConfigWithSecrets();
  const logger = createJsonLogger(config.logLevel);
  const runtime = await openRuntime(config, logger);
  await ensureApiKey(runtime.ctx, config.bootstrapApiKey);
  if (config.worker.inProcess) await startWorker(runtime.ctx, config.worker);
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
        worker: config.worker.inProcess,
      });
    },
  );
  stopOnSignals(logger, async () => {
    await new Promise((resolve) => server.close(resolve));
    await runtime.close();
  });
}

main().catch(exitOnStartupError);
