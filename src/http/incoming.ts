import { IncomingMessage } from "node:http";
import type { Context } from "hono";

/**
 * The Node request behind a hono context, under the Node server; undefined elsewhere (Lambda,
 * tests' `app.request`), where the web `Request` is all there is.
 */
export function incomingOf(c: Context): IncomingMessage | undefined {
  const incoming = (c.env as { incoming?: unknown } | undefined)?.incoming;
  return incoming instanceof IncomingMessage ? incoming : undefined;
}

/**
 * Whether the request carries a body. The Node server gives every POST a body stream, even an
 * empty one, so there the framing headers decide: a `Content-Length` above 0, or chunked.
 */
export function hasRequestBody(c: Context): boolean {
  const incoming = incomingOf(c);
  if (!incoming) return c.req.raw.body !== null;
  const length = incoming.headers["content-length"];
  return length === undefined ? incoming.headers["transfer-encoding"] !== undefined : Number(length) > 0;
}
