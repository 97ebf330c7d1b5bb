import { IncomingMessage } from "node:http";
import { Readable } from "node:stream";
import type { ReadableStream as WebReadableStream } from "node:stream/web";
import type { Context } from "hono";

/**
 * The Node request behind a hono context, under the Node server; undefined elsewhere (Lambda,
 * tests' `app.request`), where the web `Request` is all there is.
 */
export function incomingOf(c: Pick<Context, "env">): IncomingMessage | undefined {
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

/**
 * The request body as a Node stream. Under the Node server this is the socket's own
 * IncomingMessage: converting it to a web stream and back costs a third of upload throughput.
 * Other runtimes (tests' app.request, Lambda) hand over a web stream.
 */
export function requestBodyStream(c: Context): Readable {
  const incoming = incomingOf(c);
  if (incoming) return incoming;
  const body = c.req.raw.body;
  return body ? Readable.fromWeb(body as WebReadableStream<Uint8Array>) : Readable.from([]);
}

/**
 * The client's address: the connection's peer under the Node server, API Gateway's `sourceIp`
 * under Lambda; undefined where there is none (tests' `app.request`). Behind a load balancer
 * the peer is the balancer: give it the per-address limits, or turn them off.
 */
export function clientAddress(c: Pick<Context, "env">): string | undefined {
  const incoming = incomingOf(c);
  if (incoming) return incoming.socket.remoteAddress;
  const context = (c.env as { event?: { requestContext?: LambdaRequestContext } } | undefined)?.event
    ?.requestContext;
  return context?.http?.sourceIp ?? context?.identity?.sourceIp;
}

/** The parts of API Gateway's request context (HTTP API v2, REST v1) that name the client. */
interface LambdaRequestContext {
  http?: { sourceIp?: string };
  identity?: { sourceIp?: string };
}
