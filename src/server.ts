#!/usr/bin/env node
import type { AddressInfo } from "node:net";
import { createApp } from "./app.js";
import { createNodeServer } from "./http/node-server.js";
import { compileAllValidators } from "./http/openapi.js";
import { startWorker } from "./jobs/worker.js";
import { exitOnStartupError, stopOnSignals } from "./lifecycle.js";
import { createJsonLogger } from "./logger.js";
import { warmPlanner } from "./merge/preflight.js";
import { ensureApiKey, openRuntime } from "./runtime.js";
import { loadConfigWithSecrets } from "./secrets.js";

/** The API server; with the embedded default (PAPA_IN_PROCESS_WORKER) also a worker. */
async function main(): Promise<void> {
  const config = await loadConfigWithSecrets();
  const logger = createJsonLogger(config.logLevel);
  const runtime = await openRuntime(config, logger);
  await ensureApiKey(runtime.ctx, config.bootstrapApiKey);
  if (config.worker.inProcess) await startWorker(runtime.ctx, config.worker);
  const server = createNodeServer(createApp(runtime.ctx), config.http);
  server.listen(config.port, config.host, () => {
    const address = server.address() as AddressInfo;
    logger.info("listening", {
      url: `http://${config.host === "0.0.0.0" ? "127.0.0.1" : config.host}:${address.port}`,
      database: runtime.ctx.databaseKind,
      store: runtime.ctx.store.kind,
      worker: config.worker.inProcess,
    });
    // What the first requests would otherwise wait for, readied while few have come.
    warmPlanner();
    compileAllValidators().catch((error: unknown) =>
      logger.error("an operation's request validators did not compile", { error }),
    );
  });
  stopOnSignals(logger, async () => {
    await new Promise((resolve) => server.close(resolve));
    await runtime.close();
  });
}

main().catch(exitOnStartupError);
