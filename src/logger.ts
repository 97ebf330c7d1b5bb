export type LogLevel = "debug" | "info" | "warn" | "error";
export type LogFields = Record<string, unknown>;

export interface Logger {
  /** The least severe level it writes. */
  readonly level: LogLevel;
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/**
 * An error as a log field: name, message, stack and cause. A failed database query (an error
 * carrying `query` and `params`, as drizzle's) is reduced to its SQL and its cause's SQLSTATE:
 * its parameters hold what the request sent (names, metadata, values), which the logs never
 * keep, and its message and stack repeat them.
 */
export function serializeError(err: Error): LogFields {
  const cause = err.cause instanceof Error ? { cause: serializeError(err.cause) } : {};
  if ("params" in err && "query" in err) {
    return { name: err.name, message: `Failed query: ${String(err.query)}`, ...cause };
  }
  if ("code" in err && typeof err.code === "string" && "severity" in err) {
    // A database server's error: its message, `detail` and `where` may quote the values sent
    // ("invalid input syntax for type uuid: ..."); its SQLSTATE and the names of what it was about do not.
    const { table, column, constraint } = err as { table?: string; column?: string; constraint?: string };
    return {
      name: err.name,
      message: `database error ${err.code}`,
      code: err.code,
      table,
      column,
      constraint,
    };
  }
  return { name: err.name, message: err.message, stack: err.stack, ...cause };
}

/**
 * A structured logger: one JSON object per line. Callers pass fields, never secrets; errors are
 * reduced by `serializeError`.
 */
export function createJsonLogger(
  level: LogLevel = "info",
  write: (line: string) => void = (line) => process.stdout.write(line),
): Logger {
  const log = (at: LogLevel, msg: string, fields: LogFields = {}) => {
    if (ORDER[at] < ORDER[level]) return;
    const entry: LogFields = { time: new Date().toISOString(), level: at, msg };
    for (const [key, value] of Object.entries(fields)) {
      entry[key] = value instanceof Error ? serializeError(value) : value;
    }
    write(`${JSON.stringify(entry)}\n`);
  };
  return {
    level,
    debug: (m, f) => log("debug", m, f),
    info: (m, f) => log("info", m, f),
    warn: (m, f) => log("warn", m, f),
    error: (m, f) => log("error", m, f),
  };
}
