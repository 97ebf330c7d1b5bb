/**
 * Merge benchmark (issue 3): 4 checkpoints of ~100M F32 parameters (~407 MB each), uniform
 * average (papa-all). Runs, in one go on files in page cache, `papa merge` (the built CLI) and
 * a numpy baseline (bench/numpy_merge.py), each under /usr/bin/time for wall time and peak RSS,
 * checks that the outputs agree, and prints the ratio.
 * Targets: at most 1.0 s and 300 MB peak RSS.
 * Then the same merge as a job through the API (PGlite, in-process worker), on the filesystem
 * store and on s3rver: seconds from POST /v1/merges to the job's success (uploads not timed).
 *
 * usage: npm run bench:merge [-- MILLION_PARAMS]
 */
import { execFileSync, spawnSync } from "node:child_process";
import { once } from "node:events";
import { createReadStream, createWriteStream, existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import S3rver from "s3rver";
import { createApp } from "../src/app.js";
import { loadConfig, type WorkerConfig } from "../src/config.js";
import { openDatabase } from "../src/db/client.js";
import { startWorker } from "../src/jobs/worker.js";
import { createJsonLogger } from "../src/logger.js";
import { assembleRuntime } from "../src/runtime.js";
import { createApiKey } from "../src/services/api-keys/api-keys.js";
import { createCheckpoint } from "../src/services/checkpoints/checkpoints.js";
import { createTenant } from "../src/services/tenants/create-tenant.js";
import { FilesystemStore } from "../src/storage/fs-store.js";
import type { ObjectStore } from "../src/storage/object-store.js";
import { S3Store } from "../src/storage/s3-store.js";
import { openFileSource, readBytes, readSafetensorsHeader } from "../src/tensors/source.js";

const millions = Number(process.argv[2] ?? 100);
const INPUTS = 4;
const dir = join(tmpdir(), `papa-bench-merge-${millions}m`);

/** Tensors like a conv net plus transformer blocks, with BatchNorm buffers and an I64 counter. */
function layout(totalParams: number): { name: string; dtype: "F32" | "I64"; shape: number[] }[] {
  const tensors: { name: string; dtype: "F32" | "I64"; shape: number[] }[] = [];
  let params = 0;
  for (let i = 0; params < totalParams; i++) {
    const d = 512 + 128 * (i % 4);
    for (const [name, shape] of [
      [`blocks.${i}.attn.qkv.weight`, [3 * d, d]],
      [`blocks.${i}.mlp.fc1.weight`, [4 * d, d]],
      [`blocks.${i}.mlp.fc2.weight`, [d, 4 * d]],
      [`blocks.${i}.conv.weight`, [d, 64, 3, 3]],
      [`blocks.${i}.bn.running_mean`, [d]],
      [`blocks.${i}.bn.running_var`, [d]],
    ] as const) {
      tensors.push({ name, dtype: "F32", shape: [...shape] });
      params += shape.reduce((a, b) => a * b, 1);
    }
    tensors.push({ name: `blocks.${i}.bn.num_batches_tracked`, dtype: "I64", shape: [] });
  }
  return tensors;
}

async function generate(path: string, seed: number): Promise<void> {
  const tensors = layout(millions * 1e6);
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const t of tensors) {
    const bytes = t.shape.reduce((a, b) => a * b, 1) * (t.dtype === "F32" ? 4 : 8);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let text = JSON.stringify(header);
  text += " ".repeat((8 - ((text.length + 8) % 8)) % 8);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(text.length));
  const out = createWriteStream(path);
  out.write(prefix);
  out.write(text);
  let state = (seed * 2654435761) >>> 0 || 1;
  for (const t of tensors) {
    const n = t.shape.reduce((a, b) => a * b, 1);
    if (t.dtype === "I64") {
      const counter = Buffer.alloc(8);
      counter.writeBigInt64LE(BigInt(1000 + seed));
      out.write(counter);
      continue;
    }
    for (let done = 0; done < n; done += 1 << 20) {
      const chunk = new Float32Array(Math.min(1 << 20, n - done));
      for (let i = 0; i < chunk.length; i++) {
        state ^= state << 13;
        state ^= state >>> 17;
        state ^= state << 5;
        chunk[i] = ((state >>> 0) / 4294967296 - 0.5) * 2;
      }
      if (!out.write(Buffer.from(chunk.buffer))) await once(out, "drain");
    }
  }
  out.end();
  await once(out, "finish");
}

function timed(command: string, args: string[]): { seconds: number; rssMb: number } {
  const run = spawnSync("/usr/bin/time", ["-f", "%e %M", command, ...args], { encoding: "utf8" });
  if (run.status !== 0) throw new Error(`${command} failed: ${run.stderr}`);
  const [seconds, kb] = (run.stderr.trim().split("\n").at(-1) ?? "").split(" ").map(Number);
  return { seconds: seconds ?? Number.NaN, rssMb: (kb ?? Number.NaN) / 1024 };
}

/** Largest |a - b| over all F32 tensors, relative to the largest |a|. */
async function worstDifference(a: string, b: string): Promise<number> {
  const [sa, sb] = await Promise.all([openFileSource(a), openFileSource(b)]);
  const [ha, hb] = await Promise.all([readSafetensorsHeader(sa, 1e8), readSafetensorsHeader(sb, 1e8)]);
  const byName = new Map(hb.tensors.map((t) => [t.name, t]));
  let worst = 0;
  let scale = 0;
  for (const t of ha.tensors) {
    const u = byName.get(t.name);
    if (!u || t.dtype !== "F32") continue;
    const x = new Float32Array((await readBytes(sa, ha.dataStart + t.begin, t.end - t.begin)).buffer);
    const y = new Float32Array((await readBytes(sb, hb.dataStart + u.begin, u.end - u.begin)).buffer);
    for (let i = 0; i < x.length; i++) {
      worst = Math.max(worst, Math.abs((x[i] as number) - (y[i] as number)));
      scale = Math.max(scale, Math.abs(x[i] as number));
    }
  }
  await Promise.all([sa.close(), sb.close()]);
  return worst / (scale || 1);
}

/**
 * POST /v1/merges on a fresh service with the given store; seconds until a worker started the
 * job, and until it succeeded.
 */
async function mergeThroughApi(
  kind: "filesystem" | "s3",
  inputs: string[],
): Promise<{ started: number; succeeded: number }> {
  const dir = await mkdtemp(join(tmpdir(), "papa-bench-api-"));
  const database = await openDatabase({ pgliteDir: null });
  let server: S3rver | null = null;
  let store: ObjectStore;
  if (kind === "s3") {
    server = new S3rver({
      port: 0,
      address: "127.0.0.1",
      silent: true,
      directory: dir,
      configureBuckets: [{ name: "bench", configs: [] }],
    });
    const { port } = (await server.run()) as { port: number };
    store = new S3Store({
      bucket: "bench",
      region: "us-east-1",
      endpoint: `http://127.0.0.1:${port}`,
      forcePathStyle: true,
      credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" },
    });
  } else {
    store = new FilesystemStore(dir);
  }
  const logger = createJsonLogger("warn");
  const defaults = loadConfig({});
  const worker: WorkerConfig = {
    ...defaults.worker,
    queues: ["merge"],
    mergeConcurrency: 1,
    mergeThreads: availableParallelism(),
    retryLimit: 0,
    drainSeconds: 1,
  };
  const runtime = await assembleRuntime({
    database,
    store,
    config: {
      limits: { ...defaults.limits, maxUploadBytes: 2 ** 34, maxMergeInputBytes: 2 ** 36 },
      presignExpiresSeconds: 60,
      worker,
      datasets: defaults.datasets,
    },
    logger,
  });
  const { ctx } = runtime;
  const tenantId = (await createTenant({ ctx, input: { name: "bench" } })).id;
  const { secret } = await createApiKey({ ctx, principal: { tenantId }, input: {} });
  const ids: string[] = [];
  for (const [k, path] of inputs.entries()) {
    const body = createReadStream(path, { highWaterMark: 1 << 20 });
    ids.push(
      (await createCheckpoint({ ctx, principal: { tenantId }, input: { name: `member-${k}`, body } })).id,
    );
  }
  await startWorker(ctx, worker);
  const app = createApp(ctx);
  const started = performance.now();
  const res = await app.request("/v1/merges", {
    method: "POST",
    headers: { Authorization: `Bearer ${secret}`, "Content-Type": "application/json" },
    body: JSON.stringify({ method: "papa-all", inputs: ids }),
  });
  const { id } = (await res.json()) as { id: string };
  let status = "queued";
  let running = Number.NaN;
  while (!["succeeded", "failed", "canceled"].includes(status)) {
    await new Promise((r) => setTimeout(r, 20));
    const job = await app.request(`/v1/jobs/${id}`, { headers: { Authorization: `Bearer ${secret}` } });
    status = ((await job.json()) as { status: string }).status;
    if (status !== "queued" && Number.isNaN(running)) running = (performance.now() - started) / 1000;
  }
  const seconds = (performance.now() - started) / 1000;
  if (status !== "succeeded") throw new Error(`merge job ${status}`);
  await runtime.close();
  await database.close();
  if (server) await server.close();
  await rm(dir, { recursive: true, force: true });
  return { started: running, succeeded: seconds };
}

async function main(): Promise<void> {
  execFileSync("mkdir", ["-p", dir]);
  const inputs = Array.from({ length: INPUTS }, (_, k) => join(dir, `member${k}.safetensors`));
  for (const [k, path] of inputs.entries()) if (!existsSync(path)) await generate(path, k + 1);
  for (const path of inputs) await readFile(path); // into page cache
  const ours = join(dir, "ours.safetensors");
  const theirs = join(dir, "numpy.safetensors");
  const numpy = timed("python3", ["bench/numpy_merge.py", theirs, ...inputs]);
  const papa = timed(process.execPath, [
    "dist/cli.js",
    "merge",
    "--method",
    "papa-all",
    "--out",
    ours,
    ...inputs,
  ]);
  const worst = await worstDifference(theirs, ours);
  const size = (await openFileSource(inputs[0] ?? "")).size;
  console.log(
    `merge papa-all inputs=${INPUTS}x${(size / 1e6).toFixed(0)}MB ours_s=${papa.seconds.toFixed(2)} ours_peak_rss_mb=${papa.rssMb.toFixed(0)} ` +
      `numpy_s=${numpy.seconds.toFixed(2)} numpy_peak_rss_mb=${numpy.rssMb.toFixed(0)} ` +
      `speedup=${(numpy.seconds / papa.seconds).toFixed(2)}x rss_ratio=${(numpy.rssMb / papa.rssMb).toFixed(2)}x worst_rel_diff=${worst.toExponential(2)}`,
  );
  await rm(ours, { force: true });
  await rm(theirs, { force: true });
  for (const kind of ["filesystem", "s3"] as const) {
    const { started, succeeded } = await mergeThroughApi(kind, inputs);
    console.log(
      `merge-job papa-all store=${kind} seconds=${succeeded.toFixed(2)} started_after=${started.toFixed(2)} (POST /v1/merges to succeeded, to running)`,
    );
  }
}

await main();
