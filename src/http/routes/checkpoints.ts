import { Readable } from "node:stream";
import type { Context, Hono } from "hono";
import {
  assertTfjs,
  type Checkpoint,
  type CheckpointSearch,
  checkpointChangeCount,
  checkpointFile,
  createCheckpoint,
  deleteCheckpoint,
  getCheckpoint,
  listCheckpoints,
  openCheckpointFile,
  presignCheckpointFile,
  tfjsModelJson,
  tfjsWeightsOf,
  updateCheckpoint,
} from "../../services/checkpoints/checkpoints.js";
import { WEIGHTS_FILE } from "../../services/checkpoints/files.js";
import { createMultiFileCheckpoint } from "../../services/checkpoints/multi-file.js";
import {
  abortUploadSession,
  completeUploadSession,
  createUploadSession,
} from "../../services/checkpoints/upload-sessions.js";
import type { TenantCall } from "../../services/context.js";
import { InvalidInputError } from "../../services/errors.js";
import { attachmentDisposition } from "../../storage/object-store.js";
import type { AppEnv } from "../env.js";
import { requestBodyStream } from "../incoming.js";
import { multipartFiles } from "../multipart.js";
import { operation, type ValidRequest } from "../openapi.js";
import { checkpointBody, metricBody } from "../presenters.js";
import { resolveRange } from "../range.js";
import { VersionedBodies } from "../versioned-bodies.js";

/** How many bytes of checkpoints' bodies an API process keeps, to serve them again while nothing changed. */
const KEPT_BODIES_BYTES = 32 * 1024 * 1024;

export function checkpointRoutes(app: Hono<AppEnv>): void {
  operation(app, "createCheckpoint", async (c, req) => {
    const length = c.req.header("content-length");
    const call = { ctx: c.get("ctx"), principal: c.get("principal") };
    const declaredBytes = length === undefined ? undefined : Number(length);
    const type = c.req.header("content-type") ?? "";
    const checkpoint = type.toLowerCase().startsWith("multipart/form-data")
      ? await createMultiFileCheckpoint({
          ...call,
          input: {
            name: req.query.name,
            files: multipartFiles({ "content-type": type }, requestBodyStream(c)),
            declaredBytes,
          },
        })
      : await createCheckpoint({
          ...call,
          input: { name: req.query.name, body: requestBodyStream(c), declaredBytes },
        });
    c.header("Location", `/v1/checkpoints/${checkpoint.id}`);
    return c.json(checkpointBody(checkpoint), 201);
  });

  const kept = new VersionedBodies(KEPT_BODIES_BYTES);
  /**
   * Answers with the JSON that `make` gives for `resource`, kept and served again while the
   * caller's tenant's checkpoints have not changed (`checkpoint_changes`): then one small read.
   */
  const keptJson = async (
    c: Context<AppEnv>,
    resource: string,
    make: (call: Omit<TenantCall, "input">) => Promise<unknown>,
  ) => {
    const call = { ctx: c.get("ctx"), principal: c.get("principal") };
    const key = `${call.principal.tenantId} ${resource}`;
    const changes = await checkpointChangeCount(call);
    let body = kept.get(key, changes);
    if (!body) {
      body = Buffer.from(JSON.stringify(await make(call)));
      // Kept only if nothing changed while it was made: it then shows the checkpoints at `changes`.
      if ((await checkpointChangeCount(call)) === changes) kept.set(key, changes, body);
    }
    return c.body(body, 200, { "content-type": "application/json" });
  };

  operation(app, "listCheckpoints", (c, req) =>
    keptJson(c, new URL(c.req.url).search, async (call) => {
      const page = await listCheckpoints({ ...call, input: searchOf(req.query) });
      return { items: page.items.map(checkpointBody), next_cursor: page.nextCursor };
    }),
  );

  operation(app, "getCheckpoint", (c, req) =>
    keptJson(c, req.path.id, async (call) =>
      checkpointBody(await getCheckpoint({ ...call, input: req.path })),
    ),
  );

  operation(app, "deleteCheckpoint", async (c, req) => {
    await deleteCheckpoint({ ctx: c.get("ctx"), principal: c.get("principal"), input: req.path });
    return c.body(null, 204);
  });

  operation(app, "updateCheckpoint", async (c, req) => {
    const checkpoint = await updateCheckpoint({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: { id: req.path.id, ...req.body },
    });
    return c.json(checkpointBody(checkpoint));
  });

  operation(app, "listCheckpointMetrics", async (c, req) => {
    const checkpoint = await getCheckpoint({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: req.path,
    });
    return c.json({ items: checkpoint.metrics.map(metricBody) });
  });

  operation(app, "getCheckpointWeights", async (c, req) => {
    const ctx = c.get("ctx");
    const checkpoint = await getCheckpoint({ ctx, principal: c.get("principal"), input: req.path });
    return serveCheckpointFile(c, checkpoint, WEIGHTS_FILE, req.query?.redirect ?? false);
  });

  operation(app, "getCheckpointFile", async (c, req) => {
    const ctx = c.get("ctx");
    const checkpoint = await getCheckpoint({ ctx, principal: c.get("principal"), input: req.path });
    return serveCheckpointFile(c, checkpoint, req.path.filename, req.query?.redirect ?? false);
  });
}

type SearchQuery = NonNullable<ValidRequest<"listCheckpoints">["query"]>;

function searchOf(query: SearchQuery | undefined): CheckpointSearch {
  const q = query ?? {};
  const metricParts = [q.metric, q.metric_dataset, q.metric_split];
  if (metricParts.some((part) => part !== undefined) && metricParts.some((part) => part === undefined)) {
    throw new InvalidInputError(
      "metric, metric_dataset and metric_split name a metric together: give all three",
    );
  }
  if ((q.metric_min !== undefined || q.metric_max !== undefined) && q.metric === undefined) {
    throw new InvalidInputError(
      "metric_min and metric_max need the metric they bound (metric, metric_dataset, metric_split)",
    );
  }
  return {
    limit: q.limit ?? 50,
    cursor: q.cursor,
    name: q.name,
    namePrefix: q.name_prefix,
    tags: q.tag,
    jobId: q.job_id,
    parentId: q.parent_id,
    metric:
      q.metric === undefined
        ? undefined
        : {
            name: q.metric,
            dataset: q.metric_dataset as string,
            split: q.metric_split as string,
            min: q.metric_min,
            max: q.metric_max,
          },
    sort: q.sort ?? "-created_at",
  };
}

/**
 * Answers with one of a checkpoint's files: its exact bytes (whole, or one range), `ETag` its
 * quoted sha256, or a redirect to a presigned URL when asked for and the store makes them.
 * The weights download as `{model name}.safetensors`; other files under their own names.
 */
export async function serveCheckpointFile(
  c: Context<AppEnv>,
  checkpoint: Checkpoint,
  filename: string,
  redirect: boolean,
): Promise<Response> {
  const ctx = c.get("ctx");
  const file = checkpointFile(checkpoint, filename);
  const downloadName = filename === WEIGHTS_FILE ? `${checkpoint.name}.safetensors` : filename;
  const etag = `"${file.sha256}"`;
  c.header("ETag", etag);
  if (redirect) {
    const url = await presignCheckpointFile({ ctx, input: { checkpoint, file, downloadName } });
    if (url) {
      // A cached redirect must not outlive the presigned URL it points to.
      c.header("Cache-Control", `private, max-age=${Math.floor(ctx.presignExpiresSeconds / 2)}`);
      return c.redirect(url, 302);
    }
  }
  c.header("Cache-Control", "private, max-age=31536000, immutable");
  if (ifNoneMatch(c.req.header("if-none-match"), etag)) return c.body(null, 304);
  const ifRange = c.req.header("if-range");
  const range =
    ifRange === undefined || ifRange === etag ? resolveRange(c.req.header("range"), file.sizeBytes) : null;
  c.header("Accept-Ranges", "bytes");
  c.header("Content-Type", "application/octet-stream");
  c.header("Content-Disposition", attachmentDisposition(downloadName));
  if (range) c.header("Content-Range", `bytes ${range.start}-${range.end - 1}/${file.sizeBytes}`);
  const length = range ? range.end - range.start : file.sizeBytes;
  c.header("Content-Length", String(length));
  const status = range ? 206 : 200;
  // The head is complete: only now is the object opened, and not at all for HEAD.
  if (c.req.method === "HEAD") return c.body(null, status);
  const stream = await openCheckpointFile({ ctx, input: { checkpoint, file, range: range ?? undefined } });
  return c.body(Readable.toWeb(stream) as ReadableStream<Uint8Array>, status);
}

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
    const { checkpoint, created } = await completeUploadSession({
      ctx: c.get("ctx"),
      principal: c.get("principal"),
      input: {
        id: req.path.id,
        parts: req.body.parts.map((p) => ({ partNumber: p.part_number, etag: p.etag })),
      },
    });
    c.header("Location", `/v1/checkpoints/${checkpoint.id}`);
    return c.json(checkpointBody(checkpoint), created ? 201 : 200);
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
    return c.json(await tfjsModelJson({ ctx: c.get("ctx"), input: { checkpoint } }));
  });

  operation(app, "getCheckpointTfjsWeights", async (c, req) => {
    const ctx = c.get("ctx");
    const checkpoint = await getCheckpoint({ ctx, principal: c.get("principal"), input: req.path });
    // Its own entity tag: these are other bytes than the checkpoint's file, though derived from it.
    const etag = `"tfjs-${checkpoint.sha256}"`;
    c.header("ETag", etag);
    if (ifNoneMatch(c.req.header("if-none-match"), etag)) {
      assertTfjs(checkpoint); // 404 or 410 rather than 304 for what cannot be served
      return c.body(null, 304);
    }
    const { range, open } = await tfjsWeightsOf({ ctx, input: { checkpoint } });
    c.header("Content-Type", "application/octet-stream");
    c.header("Content-Length", String(range.end - range.start));
    if (c.req.method === "HEAD") return c.body(null, 200);
    return c.body(Readable.toWeb(await open()) as ReadableStream<Uint8Array>, 200);
  });
}

function ifNoneMatch(header: string | undefined, etag: string): boolean {
  if (header === undefined) return false;
  return header.trim() === "*" || header.split(",").some((tag) => tag.trim().replace(/^W\//, "") === etag);
}
