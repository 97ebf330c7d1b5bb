import { IncomingMessage } from "node:http";
import { Readable } from "node:stream";
import type { ReadableStream as WebReadableStream } from "node:stream/web";
import type { Context, Hono } from "hono";
import {
  assertCheckpointAvailable,
  createCheckpoint,
  deleteCheckpoint,
  getCheckpoint,
  listCheckpoints,
  openCheckpointWeights,
  openTfjsWeights,
  presignCheckpointWeights,
  tfjsModelJson,
} from "../../services/checkpoints/checkpoints.js";
import {
  abortUploadSession,
  completeUploadSession,
  createUploadSession,
} from "../../services/checkpoints/upload-sessions.js";
import type { AppEnv } from "../env.js";
import { operation } from "../openapi.js";
import { checkpointBody } from "../presenters.js";
import { resolveRange } from "../range.js";

export function checkpointRoutes(app: Hono<AppEnv>): void {
  operation(app, "createCheckpoint", async (c, req) => {
    const length = c.req.header("content-length");
    const checkpoint = await createCheckpoint({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: {
        name: req.query.name,
        body: requestBodyStream(c),
        declaredBytes: length === undefined ? undefined : Number(length),
      },
    });
    c.header("Location", `/v1/checkpoints/${checkpoint.id}`);
    return c.json(checkpointBody(checkpoint), 201);
  });

  operation(app, "listCheckpoints", async (c, req) => {
    const page = await listCheckpoints({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { limit: req.query?.limit ?? 50, cursor: req.query?.cursor, name: req.query?.name },
    });
    return c.json({ items: page.items.map(checkpointBody), next_cursor: page.nextCursor });
  });

  operation(app, "getCheckpoint", async (c, req) => {
    const checkpoint = await getCheckpoint({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: req.path,
    });
    return c.json(checkpointBody(checkpoint));
  });

  operation(app, "deleteCheckpoint", async (c, req) => {
    await deleteCheckpoint({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path });
    return c.body(null, 204);
  });

  operation(app, "getCheckpointWeights", async (c, req) => {
    const ctx = c.get("ctx");
    const checkpoint = await getCheckpoint({ ctx, principal: c.get("principal"), input: req.path });
    assertCheckpointAvailable(checkpoint);
    const etag = `"${checkpoint.sha256}"`;
    c.header("ETag", etag);
    c.header("Cache-Control", "private, max-age=31536000, immutable");
    if (req.query?.redirect) {
      const url = await presignCheckpointWeights({ ctx, input: { checkpoint } });
      if (url) return c.redirect(url, 302);
    }
    if (ifNoneMatch(c.req.header("if-none-match"), etag)) return c.body(null, 304);
    const ifRange = c.req.header("if-range");
    const range =
      ifRange === undefined || ifRange === etag
        ? resolveRange(c.req.header("range"), checkpoint.sizeBytes)
        : null;
    const stream = await openCheckpointWeights({ ctx, input: { checkpoint, range: range ?? undefined } });
    c.header("Accept-Ranges", "bytes");
    c.header("Content-Type", "application/octet-stream");
    c.header(
      "Content-Disposition",
      `attachment; filename="${checkpoint.name.replace(/["\\]/g, "_")}.safetensors"`,
    );
    const body = Readable.toWeb(stream) as ReadableStream<Uint8Array>;
    if (range) {
      c.header("Content-Range", `bytes ${range.start}-${range.end - 1}/${checkpoint.sizeBytes}`);
      c.header("Content-Length", String(range.end - range.start));
      return c.body(body, 206);
    }
    c.header("Content-Length", String(checkpoint.sizeBytes));
    return c.body(body, 200);
  });
}

/**
 * The request body as a Node stream. Under the Node server this is the socket's own
 * IncomingMessage: converting it to a web stream and back costs a third of upload throughput.
 * Other runtimes (tests' app.request, Lambda) hand over a web stream.
 */
export function uploadSessionRoutes(app: Hono<AppEnv>): void {
  operation(app, "createUploadSession", async (c, req) => {
    const { session, partUrls } = await createUploadSession({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { name: req.body.name, sizeBytes: req.body.size_bytes },
    });
    return c.json(
      {
        id: session.id,
        name: session.name,
        size_bytes: session.sizeBytes,
        part_size: session.partSize,
        parts: partUrls.map((url, i) => ({ part_number: i + 1, url })),
        expires_at: session.expiresAt.toISOString(),
      },
      201,
    );
  });

  operation(app, "completeUploadSession", async (c, req) => {
    const checkpoint = await completeUploadSession({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: {
        id: req.path.id,
        parts: req.body.parts.map((p) => ({ partNumber: p.part_number, etag: p.etag })),
      },
    });
    c.header("Location", `/v1/checkpoints/${checkpoint.id}`);
    return c.json(checkpointBody(checkpoint), 201);
  });

  operation(app, "abortUploadSession", async (c, req) => {
    await abortUploadSession({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path });
    return c.body(null, 204);
  });
}

export function tfjsRoutes(app: Hono<AppEnv>): void {
  operation(app, "getCheckpointTfjsModel", async (c, req) => {
    const checkpoint = await getCheckpoint({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: req.path,
    });
    return c.json(tfjsModelJson(checkpoint));
  });

  operation(app, "getCheckpointTfjsWeights", async (c, req) => {
    const ctx = c.get("ctx");
    const checkpoint = await getCheckpoint({ ctx, principal: c.get("principal"), input: req.path });
    const { body, sizeBytes } = await openTfjsWeights({ ctx, input: { checkpoint } });
    c.header("Content-Type", "application/octet-stream");
    c.header("Content-Length", String(sizeBytes));
    c.header("ETag", `"${checkpoint.sha256}"`);
    return c.body(Readable.toWeb(body) as ReadableStream<Uint8Array>, 200);
  });
}

function requestBodyStream(c: Context<AppEnv>): Readable {
  const incoming = (c.env as { incoming?: unknown } | undefined)?.incoming;
  if (incoming instanceof IncomingMessage) return incoming;
  const body = c.req.raw.body;
  return body ? Readable.fromWeb(body as WebReadableStream<Uint8Array>) : Readable.from([]);
}

function ifNoneMatch(header: string | undefined, etag: string): boolean {
  if (header === undefined) return false;
  return header.trim() === "*" || header.split(",").some((tag) => tag.trim().replace(/^W\//, "") === etag);
}
