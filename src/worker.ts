#!/usr/bin/env node
import { startWorker } from "./jobs/worker.js";
import { exitOnStartupError, stopOnSignals } from "./lifecycle.js";
import { createJsonLogger } from "./logger.js";
import { openRuntime } from "./runtime.js";
import { loadConfigWithSecrets } from "./secrets.js";

/** A worker process: consumes PAPA_WORKER_QUEUES; on SIGTERM drains, then fails what is left. */
async function main(): Promise<void> {
  const config = await loadConfigWithSecrets();
  const logger = createJsonLogger(config.logLevel);
  const runtime = await openRuntime(config, logger);
  await startWorker(runtime.ctx, config.worker);
  stopOnSignals(logger, () => runtime.close());
}

main().catch(exitOnStartupError);
