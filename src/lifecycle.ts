import { ConfigError } from "./config.js";
import type { Logger } from "./logger.js";

/**
 * Runs `stop` once on SIGTERM or SIGINT, then exits 0 (1 if stopping failed). A second signal
 * during the stop is ignored; `stop` bounds its own duration (the worker drain timeout).
 */
export function stopOnSignals(logger: Logger, stop: () => Promise<void>): void {
  let stopping = false;
  const handle = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    logger.info("stopping", { signal });
    stop().then(
      () => process.exit(0),
      (err: unknown) => {
        logger.error("shutdown failed", { error: err });
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", handle);
  process.on("SIGINT", handle);
}

/** Entry points' last resort: a config error prints its message, anything else its stack. */
export function exitOnStartupError(err: unknown): never {
  process.stderr.write(
    `${err instanceof ConfigError ? err.message : ((err as Error).stack ?? String(err))}\n`,
  );
  process.exit(1);
}
