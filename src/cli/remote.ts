import { createHash } from "node:crypto";
import { createReadStream, createWriteStream, openAsBlob } from "node:fs";
import { mkdir, open, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, join } from "node:path";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { type components, createPapaClient, type PapaClient, PapaProblemError, unwrap } from "../client.js";

type Schemas = components["schemas"];

/** Thrown for results a script should see as failure (exit 1) without a stack. */
export class CliFailure extends Error {}

export interface Remote {
  client: PapaClient;
  url: string;
  key: string;
  /** Where progress goes (stderr), so stdout stays parseable. */
  log: (line: string) => void;
}

export function connect(url: string, key: string | undefined, log: (line: string) => void): Remote {
  if (!key)
    throw new CliFailure("no API key: pass --key, set PAPA_API_KEY, or write ~/.config/papa/config.json");
  return {
    client: createPapaClient({ baseUrl: url, apiKey: key, fetch: (request) => reach(request) }),
    url,
    key,
    log,
  };
}

/** `fetch`, whose failure to reach the server (or a presigned URL) names the URL. */
async function reach(input: string | Request, init?: RequestInit): Promise<Response> {
  try {
    return await fetch(input, init);
  } catch (err) {
    if (!(err instanceof TypeError)) throw err;
    const url = typeof input === "string" ? input : input.url;
    const cause = err.cause as { code?: string; message?: string } | undefined;
    throw new CliFailure(`cannot reach ${url}: ${cause?.code ?? cause?.message ?? err.message}`);
  }
}

/** Counts bytes through a stream and reports progress at most every 200 ms. */
function progressMeter(total: number, label: string, log: (line: string) => void): Transform {
  let done = 0;
  let last = 0;
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      done += chunk.length;
      if (Date.now() - last > 200 || done === total) {
        last = Date.now();
        const pct = total > 0 ? ((100 * done) / total).toFixed(1) : "?";
        log(`${label} ${pct}% (${(done / 1e6).toFixed(1)} of ${(total / 1e6).toFixed(1)} MB)`);
      }
      cb(null, chunk);
    },
  });
}

export function upload(r: Remote, file: string, name: string): Promise<Schemas["Checkpoint"]> {
  return sendFile<Schemas["Checkpoint"]>(r, "POST", `/v1/checkpoints?name=${encodeURIComponent(name)}`, file);
}

/**
 * Uploads several files as one checkpoint (shards and their index, companion files): one
 * `multipart/form-data` request, each file read from disk as it is sent.
 */
export async function uploadFiles(r: Remote, files: string[], name: string): Promise<Schemas["Checkpoint"]> {
  const form = new FormData();
  for (const file of files) form.append("file", await openAsBlob(file), basename(file));
  r.log(`upload ${files.length} files: ${files.map((f) => basename(f)).join(", ")}`);
  const res = await reach(`${r.url}/v1/checkpoints?name=${encodeURIComponent(name)}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${r.key}` },
    body: form,
  });
  const json = (await res.json()) as unknown;
  if (!res.ok) throw new PapaProblemError(json as Schemas["Problem"]);
  return json as Schemas["Checkpoint"];
}

/** Submits a file as member `member`'s weights for round `round` of population `id`. */
export function submitMember(
  r: Remote,
  id: string,
  round: number,
  member: number,
  file: string,
): Promise<Schemas["PopulationSubmission"]> {
  return sendFile(r, "PUT", `/v1/populations/${id}/rounds/${round}/members/${member}`, file);
}

/** Streams a file as the body of a request, with progress on the log; the JSON answer, or its problem thrown. */
async function sendFile<T>(r: Remote, method: string, path: string, file: string): Promise<T> {
  const { size } = await stat(file);
  const body = Readable.toWeb(createReadStream(file).pipe(progressMeter(size, "upload", r.log)));
  const res = await reach(`${r.url}${path}`, {
    method,
    headers: {
      Authorization: `Bearer ${r.key}`,
      "Content-Type": "application/octet-stream",
      "Content-Length": String(size),
    },
    body: body as ReadableStream,
    duplex: "half",
  } as RequestInit);
  const json = (await res.json()) as unknown;
  if (!res.ok) throw new PapaProblemError(json as Schemas["Problem"]);
  return json as T;
}

interface SessionState {
  file: string;
  size: number;
  mtimeMs: number;
  session: Schemas["UploadSession"];
  etags: Record<string, string>;
}

/**
 * Uploads through a presigned multipart session (S3 deployments), part by part, recording each
 * finished part in `stateFile`: run again after an interruption and the finished parts are
 * skipped. The state is dropped when the file changed or the session's URLs expired.
 */
export async function uploadResumable(
  r: Remote,
  file: string,
  name: string,
  stateFile: string,
): Promise<Schemas["Checkpoint"]> {
  const { size, mtimeMs } = await stat(file);
  let state: SessionState | null = null;
  try {
    const saved = JSON.parse(await readFile(stateFile, "utf8")) as SessionState;
    const fresh = Date.parse(saved.session.expires_at) > Date.now() + 60_000;
    if (saved.file === file && saved.size === size && saved.mtimeMs === mtimeMs && fresh) state = saved;
  } catch {
    // no state yet
  }
  if (state) {
    r.log(
      `resuming upload session ${state.session.id}: ${Object.keys(state.etags).length} of ${state.session.parts.length} parts done`,
    );
  } else {
    const session = unwrap(await r.client.POST("/v1/upload-sessions", { body: { name, size_bytes: size } }));
    state = { file, size, mtimeMs, session, etags: {} };
    await writeFile(stateFile, JSON.stringify(state));
  }
  const { part_size: partSize, parts } = state.session;
  for (const part of parts) {
    if (state.etags[part.part_number]) continue;
    const start = (part.part_number - 1) * partSize;
    const slice = await readBytes(file, start, Math.min(partSize, size - start));
    const res = await reach(part.url, { method: "PUT", body: slice });
    if (!res.ok) throw new CliFailure(`part ${part.part_number} failed: ${res.status} ${await res.text()}`);
    state.etags[part.part_number] = res.headers.get("etag") ?? "";
    await writeFile(stateFile, JSON.stringify(state));
    r.log(`upload part ${part.part_number} of ${parts.length}`);
  }
  const checkpoint = unwrap(
    await r.client.POST("/v1/upload-sessions/{id}/complete", {
      params: { path: { id: state.session.id } },
      body: {
        parts: parts.map((p) => ({ part_number: p.part_number, etag: state?.etags[p.part_number] ?? "" })),
      },
    }),
  );
  await rm(stateFile, { force: true });
  return checkpoint;
}

async function readBytes(file: string, start: number, length: number): Promise<Uint8Array> {
  const handle = await open(file, "r");
  try {
    const bytes = new Uint8Array(length);
    await handle.read(bytes, 0, length, start);
    return bytes;
  } finally {
    await handle.close();
  }
}

/**
 * Downloads a checkpoint: its one file `model.safetensors` to `to` (default `ID.safetensors`),
 * or (several files) each of its files into the folder `to` (default `ID`). Each file's sha256
 * is checked against its ETag. Returns the paths written, each with its sha256.
 */
export async function download(r: Remote, id: string, to?: string): Promise<[string, string][]> {
  const checkpoint = unwrap(await r.client.GET("/v1/checkpoints/{id}", { params: { path: { id } } }));
  const [only, ...rest] = checkpoint.files;
  if (only && rest.length === 0 && only.name === "model.safetensors") {
    const out = to ?? `${id}.safetensors`;
    return [[out, await downloadFile(r, only.url, out)]];
  }
  const out = to ?? id;
  await mkdir(out, { recursive: true });
  const written: [string, string][] = [];
  for (const file of checkpoint.files) {
    const path = join(out, file.name);
    written.push([path, await downloadFile(r, file.url, path)]);
  }
  return written;
}

/** Downloads one file to `out` (through `out.partial`), checking its sha256 against the ETag. */
async function downloadFile(r: Remote, url: string, out: string): Promise<string> {
  const res = await reach(`${r.url}${url}`, {
    headers: { Authorization: `Bearer ${r.key}` },
  });
  if (!res.ok || !res.body) throw new PapaProblemError((await res.json()) as Schemas["Problem"]);
  const expected = (res.headers.get("etag") ?? "").replaceAll('"', "");
  const total = Number(res.headers.get("content-length") ?? 0);
  const hash = createHash("sha256");
  const tmp = `${out}.partial`;
  try {
    await pipeline(
      Readable.fromWeb(res.body as import("node:stream/web").ReadableStream),
      progressMeter(total, `download ${basename(out)}`, r.log),
      new Transform({
        transform(chunk: Buffer, _enc, cb) {
          hash.update(chunk);
          cb(null, chunk);
        },
      }),
      createWriteStream(tmp),
    );
    const actual = hash.digest("hex");
    if (actual !== expected)
      throw new CliFailure(`sha256 mismatch: got ${actual}, the server says ${expected}`);
    await rename(tmp, out);
    return actual;
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

export async function followJob(r: Remote, id: string): Promise<Schemas["Job"]> {
  const res = await reach(`${r.url}/v1/jobs/${id}/events`, { headers: { Authorization: `Bearer ${r.key}` } });
  if (!res.ok || !res.body) throw new PapaProblemError((await res.json()) as Schemas["Problem"]);
  let last: Schemas["Job"] | null = null;
  let buffer = "";
  for await (const chunk of Readable.fromWeb(res.body as import("node:stream/web").ReadableStream)) {
    buffer += Buffer.from(chunk as Uint8Array).toString();
    let end = buffer.indexOf("\n\n");
    while (end >= 0) {
      const data = buffer
        .slice(0, end)
        .split("\n")
        .filter((l) => l.startsWith("data: "))
        .map((l) => l.slice(6))
        .join("\n");
      buffer = buffer.slice(end + 2);
      end = buffer.indexOf("\n\n");
      if (!data) continue;
      last = JSON.parse(data) as Schemas["Job"];
      const detail = last.progress_detail ? ` ${JSON.stringify(last.progress_detail)}` : "";
      r.log(`job ${last.id} ${last.status} ${(100 * last.progress).toFixed(1)}%${detail}`);
    }
  }
  if (!last) throw new CliFailure(`no events for job ${id}`);
  return last;
}

/**
 * The lineage as an indented tree: each parent under its child, with coefficient and metrics. A
 * checkpoint reached again (a shared ancestor) is named, marked "(above)", and not expanded
 * twice, so the tree has one line per edge, not one per path.
 */
export async function lineageTree(r: Remote, id: string, depth: number): Promise<string> {
  const l = unwrap(
    await r.client.GET("/v1/checkpoints/{id}/lineage", {
      params: { path: { id }, query: { direction: "ancestors", depth } },
    }),
  );
  const nodes = new Map(l.nodes.map((n) => [n.id, n]));
  const lines: string[] = [];
  const printed = new Set<string>();
  const parents = new Map<string, typeof l.edges>();
  for (const e of l.edges) parents.set(e.child_id, [...(parents.get(e.child_id) ?? []), e]);
  const walk = (node: string, prefix: string, coefficient: number | null) => {
    const n = nodes.get(node);
    const metrics = (n?.metrics ?? []).map((m) => `${m.name}=${m.value.toFixed(4)}`).join(" ");
    const weight = coefficient === null ? "" : `${coefficient.toFixed(4)} x `;
    const again = printed.has(node);
    lines.push(
      `${prefix}${weight}${n?.name ?? node} (${node})${n?.status === "deleted" ? " [deleted]" : ""}${metrics ? ` ${metrics}` : ""}${again ? " (above)" : ""}`,
    );
    if (again) return;
    printed.add(node);
    for (const e of l.edges.filter((x) => x.child_id === node))
      walk(e.parent_id, `${prefix}  `, e.coefficient);
  };
  walk(id, "", null);
  for (const c of l.contributions)
    lines.push(
      `contribution ${c.weight.toFixed(4)} of ${nodes.get(c.checkpoint_id)?.name ?? c.checkpoint_id}${c.root ? "" : " (where the walk stopped)"}`,
    );
  return lines.join("\n");
}
