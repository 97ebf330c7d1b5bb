import type { Context, Hono } from "hono";
import { type Checkpoint, checkpointFile } from "../../services/checkpoints/checkpoints.js";
import { NotFoundError } from "../../services/errors.js";
import { commitOf, getModelSummary, MAIN, resolveRevision } from "../../services/models/models.js";
import type { AppEnv } from "../env.js";
import { operation } from "../openapi.js";
import { serveCheckpointFile } from "./checkpoints.js";

/**
 * Runs a lookup; a resource it does not find is answered with the Hub's `X-Error-Code`, by which
 * its clients tell a missing repository, revision or file apart (and, for a missing file, go on
 * without it, as `transformers` does for optional files).
 */
async function hub<T>(c: Context<AppEnv>, errorCode: string, lookup: () => Promise<T>): Promise<T> {
  try {
    return await lookup();
  } catch (err) {
    if (err instanceof NotFoundError) c.header("X-Error-Code", errorCode);
    throw err;
  }
}

async function revisionOf(c: Context<AppEnv>, name: string, revision: string): Promise<Checkpoint> {
  const call = { ctx: c.get("ctx"), principal: c.get("principal") };
  await hub(c, "RepoNotFound", () => getModelSummary({ ...call, input: { name } }));
  return hub(c, "RevisionNotFound", () => resolveRevision({ ...call, input: { name, revision } }));
}

/** The Hub's model info: what `HfApi().model_info` and `snapshot_download` read. */
function modelInfo(checkpoint: Checkpoint) {
  return {
    id: checkpoint.name,
    modelId: checkpoint.name,
    sha: commitOf(checkpoint),
    private: true,
    disabled: false,
    gated: false,
    tags: checkpoint.tags,
    library_name: "safetensors",
    createdAt: checkpoint.createdAt.toISOString(),
    lastModified: checkpoint.createdAt.toISOString(),
    siblings: checkpoint.files.map((file) => ({
      rfilename: file.name,
      size: file.sizeBytes,
      // Git LFS pointers are about 134 bytes; the Hub reports their size with the blob's.
      lfs: { size: file.sizeBytes, sha256: file.sha256, pointerSize: 134 },
    })),
  };
}

/**
 * The Hugging Face Hub's download protocol under `/hf`, with a model's name as the repository
 * id and its versions as revisions, so that `huggingface_hub` (and `transformers`) download
 * from this service with `HF_ENDPOINT=$PAPA_URL/hf` and an API key as `HF_TOKEN`.
 */
export function hfRoutes(app: Hono<AppEnv>): void {
  operation(app, "getHfModelInfo", async (c, req) =>
    c.json(modelInfo(await revisionOf(c, req.path.name, MAIN))),
  );

  operation(app, "getHfModelInfoAtRevision", async (c, req) =>
    c.json(modelInfo(await revisionOf(c, req.path.name, req.path.revision))),
  );

  operation(app, "resolveHfFile", async (c, req) => {
    const checkpoint = await revisionOf(c, req.path.name, req.path.revision);
    c.header("X-Repo-Commit", commitOf(checkpoint));
    const file = await hub(c, "EntryNotFound", async () => checkpointFile(checkpoint, req.path.filename));
    // A redirect to the store's presigned URL carries no Content-Length or ETag of the file:
    // the Hub's clients read these instead.
    c.header("X-Linked-Size", String(file.sizeBytes));
    c.header("X-Linked-Etag", `"${file.sha256}"`);
    return serveCheckpointFile(c, checkpoint, file.name, true);
  });
}
