import type { Server } from "node:http";
import type { Socket } from "node:net";
import { createAdaptorServer } from "@hono/node-server";
import type { Hono } from "hono";
import type { HttpServerConfig } from "../config.js";
import type { AppEnv } from "./env.js";
import { incomingOf } from "./incoming.js";

/**
 * The app as a Node HTTP server that holds against slow and partial requests:
 * - a request head must arrive within `headersTimeoutSeconds` (408, then closed); Node's own
 *   default would be 0 - none - here, since request bodies themselves have no time limit;
 * - a connection on which nothing moves for `idleTimeoutSeconds` while the request body comes in
 *   or the response goes out is closed: a stalled upload, a client that stopped reading. A slow
 *   body that keeps moving is never cut, however long it takes; a handler's own work (validating
 *   a 20 GiB upload session, say) does not count as idle;
 * - at most `maxConnections` connections, and `maxConnectionsPerClient` from one address (0: no
 *   such cap; behind a load balancer every connection comes from it): more are closed on arrival.
 */
export function createNodeServer(app: Hono<AppEnv>, config: HttpServerConfig): Server {
  const idleMs = config.idleTimeoutSeconds * 1000;
  const headersMs = config.headersTimeoutSeconds * 1000;
  const server = createAdaptorServer({
    fetch: async (request: Request, env: unknown) => {
      const incoming = incomingOf({ env });
      const socket = incoming?.socket;
      if (!incoming || !socket) return app.fetch(request, env);
      // Idle while the body comes in; not while the handler works on it.
      const lift = () => socket.setTimeout(0);
      if (incoming.complete) lift();
      else incoming.once("end", lift);
      try {
        return await app.fetch(request, env);
      } finally {
        incoming.off("end", lift);
        // The response goes out next: the client must keep reading it.
        if (!socket.destroyed) socket.setTimeout(idleMs);
      }
    },
    serverOptions: {
      maxHeaderSize: config.maxHeaderBytes,
      requestTimeout: 0,
      headersTimeout: headersMs,
      // How often heads that are too slow are looked for (Node's default is every 30 s).
      connectionsCheckingInterval: Math.min(1000, headersMs),
    },
  }) as Server;
  server.timeout = idleMs;
  server.maxConnections = config.maxConnections;
  if (config.maxConnectionsPerClient > 0) limitPerClient(server, config.maxConnectionsPerClient);
  return server;
}

function limitPerClient(server: Server, max: number): void {
  const open = new Map<string, number>();
  server.on("connection", (socket: Socket) => {
    const address = socket.remoteAddress ?? "";
    const count = (open.get(address) ?? 0) + 1;
    if (count > max) {
      socket.destroy();
      return;
    }
    open.set(address, count);
    socket.once("close", () => {
      const left = (open.get(address) ?? 1) - 1;
      if (left === 0) open.delete(address);
      else open.set(address, left);
    });
  });
}
