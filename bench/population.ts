/**
 * Populations through the API (issue 14), on the embedded default (PGlite, filesystem store,
 * in-process worker with its default settings): a population of `MEMBERS` papa-all members of
 * `MB` megabytes of F32 each, `ROUNDS` rounds. Each round, every member but the last submits;
 * then the time from the last member's PUT to every output ready (`GET .../rounds/r?wait`
 * answering `closed`) is measured, and split into the PUT itself (upload, validation, close)
 * and the merge job. Prints one line per size with the median and the worst round.
 * Targets: 4 members of 1 MB under 150 ms; of 100 MB under 2 s.
 *
 * usage: npm run bench:population [-- MB[,MB...] [MEMBERS [ROUNDS]]]   (default 1,100 4 5)
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createApp } from "../src/app.js";
import { loadConfig } from "../src/config.js";
import { openDatabase } from "../src/db/client.js";
import { startWorker } from "../src/jobs/worker.js";
import { createJsonLogger } from "../src/logger.js";
import { assembleRuntime } from "../src/runtime.js";
import { createApiKey } from "../src/services/api-keys/api-keys.js";
import { createTenant } from "../src/services/tenants/create-tenant.js";
import { FilesystemStore } from "../src/storage/fs-store.js";
import { median } from "./stats.js";

const sizesMb = (process.argv[2] ?? "1,100").split(",").map(Number);
const members = Number(process.argv[3] ?? 4);
const rounds = Number(process.argv[4] ?? 5);

/** A safetensors file of `mb` megabytes of F32 in 8 tensors, every value `value`. */
function checkpoint(mb: number, value: number): Buffer {
  const tensors = 8;
  const elements = Math.floor((mb * 1e6) / 4 / tensors);
  const header: Record<string, unknown> = {};
  for (let t = 0; t < tensors; t++) {
    header[`layer${t}.weight`] = {
      dtype: "F32",
      shape: [elements],
      data_offsets: [t * elements * 4, (t + 1) * elements * 4],
    };
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (json.length % 8)) % 8);
  const data = new Float32Array(tensors * elements).fill(value);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([length, Buffer.from(json), Buffer.from(data.buffer)]);
}

async function measure(mb: number): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "papa-bench-population-"));
  const database = await openDatabase({ pgliteDir: null });
  const defaults = loadConfig({});
  const worker = { ...defaults.worker, queues: ["merge" as const] };
  const runtime = await assembleRuntime({
    database,
    store: new FilesystemStore(dir),
    config: { limits: defaults.limits, presignExpiresSeconds: 60, worker, datasets: defaults.datasets },
    logger: createJsonLogger("warn"),
  });
  const { ctx } = runtime;
  await startWorker(ctx, worker);
  const app = createApp(ctx);
  const tenantId = (await createTenant({ ctx, input: { name: "bench" } })).id;
  const { secret } = await createApiKey({ ctx, principal: { tenantId }, input: {} });
  const auth = { Authorization: `Bearer ${secret}` };
  const call = async (path: string, init: RequestInit = {}) => {
    const res = await app.request(path, { ...init, headers: { ...auth, ...(init.headers ?? {}) } });
    if (res.status >= 300) throw new Error(`${path}: ${res.status} ${await res.text()}`);
    return (await res.json()) as Record<string, unknown>;
  };
  const { id } = await call("/v1/populations", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name: "bench", size: members, method: "papa-all" }),
  });
  const files = Array.from({ length: members }, (_, j) => checkpoint(mb, j + 1));
  const put = (r: number, j: number) =>
    call(`/v1/populations/${id}/rounds/${r}/members/${j}`, {
      method: "PUT",
      headers: { "Content-Type": "application/octet-stream" },
      body: files[j],
    });
  const totals: number[] = [];
  const puts: number[] = [];
  for (let r = 0; r < rounds; r++) {
    for (let j = 0; j < members - 1; j++) await put(r, j);
    const started = performance.now();
    await put(r, members - 1);
    puts.push(performance.now() - started);
    const round = await call(`/v1/populations/${id}/rounds/${r}?wait=120`);
    if (round.status !== "closed") throw new Error(`round ${r} is ${round.status}`);
    totals.push(performance.now() - started);
  }
  const merges = totals.map((t, i) => t - (puts[i] ?? 0));
  console.log(
    `population members=${members} mb=${mb} rounds=${rounds} last_put_to_outputs_ms p50=${median(totals).toFixed(0)} max=${Math.max(...totals).toFixed(0)} (put p50=${median(puts).toFixed(0)}, merge job p50=${median(merges).toFixed(0)})`,
  );
  await runtime.close();
  await database.close();
  await rm(dir, { recursive: true, force: true });
}

for (const mb of sizesMb) await measure(mb);
