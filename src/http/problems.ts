import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import type { Logger } from "../logger.js";
import { RangeNotSatisfiableError, RetryLaterError, ServiceError } from "../services/errors.js";
import type { AppEnv } from "./env.js";
import { incomingOf } from "./incoming.js";

/** One mismatch between a request and openapi.yaml. */
export interface RequestMismatch {
  in: "path" | "query" | "header" | "body";
  name?: string;
  message: string;
}

/** Errors only the HTTP layer can detect: the request does not match the contract. */
export class HttpProblem extends Error {
  constructor(
    readonly status: 400 | 401 | 404 | 415 | 422,
    readonly code: string,
    message: string,
    readonly errors?: RequestMismatch[],
  ) {
    super(message);
    this.name = "HttpProblem";
  }
}

const SERVICE_STATUS: Record<string, ContentfulStatusCode> = {
  "not-found": 404,
  "invalid-input": 422,
  conflict: 409,
  "payload-too-large": 413,
  gone: 410,
  "range-not-satisfiable": 416,
  unauthenticated: 401,
  "too-many-requests": 429,
  unavailable: 503,
};

const TITLES: Record<number, string> = {
  400: "Bad Request",
  401: "Unauthorized",
  404: "Not Found",
  405: "Method Not Allowed",
  409: "Conflict",
  410: "Gone",
  413: "Content Too Large",
  415: "Unsupported Media Type",
  416: "Range Not Satisfiable",
  422: "Unprocessable Content",
  429: "Too Many Requests",
  500: "Internal Server Error",
  503: "Service Unavailable",
};

export function problemResponse(
  c: Context<AppEnv>,
  status: ContentfulStatusCode,
  code: string,
  detail: string,
  extra: Record<string, unknown> = {},
): Response {
  const body = {
    type: `urn:papa:problem:${code}`,
    title: TITLES[status] ?? "Error",
    status,
    detail,
    instance: c.req.path,
    request_id: c.get("requestId"),
    ...extra,
  };
  return c.body(JSON.stringify(body), status, { "Content-Type": "application/problem+json" });
}

/**
 * The one place errors become responses. Service and contract errors keep their message; any
 * other error is logged and answered as an opaque 500 that carries only the request id.
 */
export function errorHandler(logger: Logger) {
  return (err: Error, c: Context<AppEnv>): Response => {
    // Refused before its body was read (a declared length over a limit, a bad key): close the
    // connection after the answer rather than read, or keep waiting for, the rest of the body.
    const incoming = incomingOf(c);
    if (incoming && !incoming.complete) c.header("Connection", "close");
    if (err instanceof ServiceError) {
      const status = SERVICE_STATUS[err.code] ?? 500;
      if (err instanceof RangeNotSatisfiableError) c.header("Content-Range", `bytes */${err.sizeBytes}`);
      if (err instanceof RetryLaterError) c.header("Retry-After", String(Math.ceil(err.retryAfterSeconds)));
      if (status === 401) c.header("WWW-Authenticate", 'Bearer realm="papa"');
      return problemResponse(c, status, err.code, err.message, err.details);
    }
    if (err instanceof HttpProblem) {
      if (err.status === 401) c.header("WWW-Authenticate", 'Bearer realm="papa"');
      return problemResponse(c, err.status, err.code, err.message, err.errors ? { errors: err.errors } : {});
    }
    if (err instanceof HTTPException && err.status < 500) {
      return problemResponse(c, err.status, "http", err.message || (TITLES[err.status] ?? "error"));
    }
    if (c.req.raw.signal.aborted) {
      logger.info("request aborted by the client", { request_id: c.get("requestId"), error: err.message });
    } else {
      logger.error("unhandled error", { request_id: c.get("requestId"), error: err });
    }
    return problemResponse(
      c,
      500,
      "internal",
      "An internal error occurred; quote the request_id when reporting it.",
    );
  };
}
