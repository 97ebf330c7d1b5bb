/**
 * Merge benchmark (issue 3): 4 checkpoints of ~100M F32 parameters (~407 MB each), uniform
 * average (papa-all). Runs, in one go on files in page cache, `papa merge` (the built CLI) and
 * a numpy baseline (bench/numpy_merge.py), each under /usr/bin/time for wall time and peak RSS,
 * checks that the outputs agree, and prints the ratio and where the engine's time goes (reading,
 * merging on its threads, writing: `papa merge`'s own account).
 * Targets: at most 1.0 s and 300 MB peak RSS.
 * Then the same merge as a job through the API of the compiled service (`node dist/server.js`,
 * PGlite, in-process worker), on the filesystem store and on S3 (s3rver, in a process of its
 * own): seconds from POST /v1/merges to the job's success (uploads not timed), against `papa
 * merge` with its output synced to disk (the filesystem store makes every object durable) for
 * the filesystem and against a plain copy of the same bytes through the same S3 client for S3,
 * each baseline run just before its job: the first merge on a fresh service, and a second one.
 * Targets: within 1.3x of each; a small merge (`-- 1`: 4 x 13 MB) within 0.2 s.
 *
 * usage: npm run bench:merge [-- MILLION_PARAMS]
 */
import { execFileSync, spawnSync } from "node:child_process";
import { once } from "node:events";
import { createReadStream, createWriteStream, existsSync } from "node:fs";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { blockElementsFor, slotCount } from "../src/merge/engine.js";
import type { S3StoreOptions } from "../src/storage/object-store.js";
import { S3Store } from "../src/storage/s3-store.js";
import { openFileSource, readBytes, readSafetensorsHeader } from "../src/tensors/source.js";
import { BENCH_KEY, rssRise, s3Settings, startS3rver, startService } from "./server.js";

const millions = Number(process.argv[2] ?? 100);
const INPUTS = 4;
const dir = join(tmpdir(), `papa-bench-merge-${millions}m`);
/** How often a job's state is asked for (each answer costs the service a little CPU). */
const POLL_MS = 20;

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

function timed(command: string, args: string[]): { seconds: number; rssMb: number; stdout: string } {
  const run = spawnSync("/usr/bin/time", ["-f", "%e %M", command, ...args], { encoding: "utf8" });
  if (run.status !== 0) throw new Error(`${command} failed: ${run.stderr}`);
  const [seconds, kb] = (run.stderr.trim().split("\n").at(-1) ?? "").split(" ").map(Number);
  return { seconds: seconds ?? Number.NaN, rssMb: (kb ?? Number.NaN) / 1024, stdout: run.stdout };
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
 * The baseline for the S3 store: a plain copy of the merge's bytes through the service's S3
 * client (`S3Store`) with the merge's concurrency: the inputs read in the merge's blocks, as many
 * blocks in flight, and the first input's bytes written as one output. The inputs are put once;
 * `copy` times one copy (seconds), `close` removes them.
 */
async function plainS3Copy(
  options: S3StoreOptions,
  inputs: string[],
): Promise<{ copy(): Promise<number>; close(): Promise<void> }> {
  const store = new S3Store(options);
  const size = (await stat(inputs[0] ?? "")).size;
  const keys = inputs.map((_, k) => `copy/input-${k}`);
  for (const [k, path] of inputs.entries()) await store.put(keys[k] ?? "", createReadStream(path));
  const slots = slotCount(availableParallelism());
  const blockBytes = blockElementsFor(inputs.length, 1, slots) * 4;
  const buffers = Array.from({ length: slots }, () => keys.map(() => new Uint8Array(blockBytes)));
  const blocks = Math.ceil(size / blockBytes);
  const read = (b: number) => {
    const offset = b * blockBytes;
    const length = Math.min(blockBytes, size - offset);
    const slot = (buffers[b % slots] ?? []).map((buffer) => buffer.subarray(0, length));
    return Promise.all(keys.map((key, k) => store.read(key, offset, slot[k] as Uint8Array))).then(() => slot);
  };
  return {
    copy: async () => {
      const started = performance.now();
      const writer = await store.create("copy/output");
      const pending = Array.from({ length: Math.min(slots, blocks) }, (_, b) => read(b));
      for (let b = 0; b < blocks; b++) {
        const slot = await (pending.shift() as Promise<Uint8Array[]>);
        await writer.write(slot[0] as Uint8Array);
        if (b + slots < blocks) pending.push(read(b + slots));
      }
      await writer.commit();
      const seconds = (performance.now() - started) / 1000;
      await store.delete("copy/output");
      return seconds;
    },
    close: async () => {
      for (const key of keys) await store.delete(key);
      store.close();
    },
  };
}

/**
 * A job's seconds until it ran and until it succeeded, its baseline's, measured just before it,
 * and the service's RSS before and at its peak during the job (`rssRise`'s fields).
 */
interface JobTime {
  started: number;
  succeeded: number;
  baseline: number;
  rss: string;
}

/**
 * The compiled service (`node dist/server.js`, PGlite, in-process worker) on the given store:
 * the inputs uploaded through the API, then twice `baseline` and POST /v1/merges right after it,
 * so that both meet the machine in the same state (its page cache, its dirty pages: after the
 * uploads, a merge's writes are slower than on an idle machine); seconds until the job ran, and
 * until it succeeded (the POST's own time included).
 */
async function mergeThroughApi(
  inputs: string[],
  s3Env: Record<string, string> | null,
  baseline: () => Promise<number>,
): Promise<Record<"first" | "again", JobTime>> {
  const dir = await mkdtemp(join(tmpdir(), "papa-bench-api-"));
  const service = await startService(dir, s3Env ?? {});
  try {
    const base = service.url;
    const call = async <T>(path: string, init: RequestInit = {}): Promise<T> => {
      const res = await fetch(`${base}${path}`, {
        ...init,
        headers: { Authorization: `Bearer ${BENCH_KEY}`, ...init.headers },
      });
      if (!res.ok) throw new Error(`${init.method ?? "GET"} ${path}: ${res.status} ${await res.text()}`);
      return (await res.json()) as T;
    };
    const ids: string[] = [];
    for (const [k, path] of inputs.entries()) {
      const body = Readable.toWeb(createReadStream(path, { highWaterMark: 1 << 20 })) as ReadableStream;
      const upload = {
        method: "POST",
        body,
        duplex: "half",
        headers: { "Content-Type": "application/octet-stream" },
      };
      ids.push((await call<{ id: string }>(`/v1/checkpoints?name=member-${k}`, upload as RequestInit)).id);
    }
    const merge = async (): Promise<JobTime> => {
      const baselineSeconds = await baseline();
      const started = performance.now();
      let running = Number.NaN;
      const rss = await rssRise(service.pid, async () => {
        const { id } = await call<{ id: string }>("/v1/merges", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ method: "papa-all", inputs: ids }),
        });
        let status = "queued";
        while (!["succeeded", "failed", "canceled"].includes(status)) {
          await new Promise((r) => setTimeout(r, POLL_MS));
          ({ status } = await call<{ status: string }>(`/v1/jobs/${id}`));
          if (status !== "queued" && Number.isNaN(running)) running = (performance.now() - started) / 1000;
        }
        if (status !== "succeeded") throw new Error(`merge job ${status}`);
      });
      const succeeded = (performance.now() - started) / 1000;
      return { started: running, succeeded, baseline: baselineSeconds, rss };
    };
    const first = await merge();
    const again = await merge();
    return { first, again };
  } finally {
    await service.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  execFileSync("mkdir", ["-p", dir]);
  const inputs = Array.from({ length: INPUTS }, (_, k) => join(dir, `member${k}.safetensors`));
  for (const [k, path] of inputs.entries()) if (!existsSync(path)) await generate(path, k + 1);
  for (const path of inputs) await readFile(path); // into page cache
  const ours = join(dir, "ours.safetensors");
  const theirs = join(dir, "numpy.safetensors");
  const numpy = timed("/usr/bin/python3", ["bench/numpy_merge.py", theirs, ...inputs]);
  const papaMerge = [
    process.execPath,
    "dist/cli.js",
    "merge",
    "--method",
    "papa-all",
    "--out",
    ours,
    ...inputs,
  ];
  const papa = timed(papaMerge[0] as string, papaMerge.slice(1));
  const worst = await worstDifference(theirs, ours);
  const size = (await openFileSource(inputs[0] ?? "")).size;
  console.log(
    `merge papa-all inputs=${INPUTS}x${(size / 1e6).toFixed(0)}MB ours_s=${papa.seconds.toFixed(2)} ours_peak_rss_mb=${papa.rssMb.toFixed(0)} ` +
      `numpy_s=${numpy.seconds.toFixed(2)} numpy_peak_rss_mb=${numpy.rssMb.toFixed(0)} ` +
      `speedup=${(numpy.seconds / papa.seconds).toFixed(2)}x rss_ratio=${(numpy.rssMb / papa.rssMb).toFixed(2)}x worst_rel_diff=${worst.toExponential(2)}`,
  );
  // Where the engine's time goes, as `papa merge` reports it.
  console.log(`papa merge: ${papa.stdout.trim()}`);
  await rm(ours, { force: true });
  await rm(theirs, { force: true });
  // The filesystem store makes each object durable (fsync) before it exists: the like-for-like
  // baseline for a job is the same merge with its output synced to disk.
  const papaMergeThenSync = async () => {
    const seconds = timed("sh", ["-c", `"$@" && sync --data ${ours}`, "sh", ...papaMerge]).seconds;
    await rm(ours, { force: true });
    return seconds;
  };
  const times = (kind: string, t: JobTime) =>
    `${kind}_s=${t.succeeded.toFixed(2)} ${kind}_started_after=${t.started.toFixed(2)} ${kind}_baseline_s=${t.baseline.toFixed(2)} ${kind}_ratio=${(t.succeeded / t.baseline).toFixed(2)}x`;
  const fsJob = await mergeThroughApi(inputs, null, papaMergeThenSync);
  console.log(
    `merge-job papa-all store=filesystem baseline=papa_merge_then_sync ${times("first", fsJob.first)} ${times("again", fsJob.again)}`,
  );
  console.log(`merge-job-memory store=filesystem first: ${fsJob.first.rss} again: ${fsJob.again.rss}`);
  const s3Dir = await mkdtemp(join(tmpdir(), "papa-bench-s3-"));
  const s3 = await startS3rver(s3Dir);
  try {
    const { env, options } = s3Settings(s3.endpoint);
    const copy = await plainS3Copy(options, inputs);
    try {
      const s3Job = await mergeThroughApi(inputs, env, copy.copy);
      console.log(
        `merge-job papa-all store=s3 baseline=plain_copy ${times("first", s3Job.first)} ${times("again", s3Job.again)}`,
      );
      console.log(`merge-job-memory store=s3 first: ${s3Job.first.rss} again: ${s3Job.again.rss}`);
    } finally {
      await copy.close();
    }
  } finally {
    await s3.stop();
    await rm(s3Dir, { recursive: true, force: true });
  }
}

await main();
