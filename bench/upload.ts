/**
 * Upload benchmark: a 1 GiB safetensors checkpoint through the API, then a 1 GiB dataset (IDX
 * images, multipart/form-data), into the filesystem store and into S3 (s3rver, in a process of
 * its own). Starts the built server (`dist/server.js`, PGlite) in a temp dir, streams the
 * checkpoint over HTTP with curl three times and the dataset once, and on S3 also uploads the
 * checkpoint through an upload session with the `papa` CLI (presigned parts straight to the
 * store, then the service's validation), sampling the server's RSS every 20 ms throughout.
 * The disk's write speed varies run to run on shared machines: read all three numbers.
 * Targets: at least 200 MB/s and a server peak RSS rise under 100 MB for the checkpoint (issues
 * 2 and 16); an RSS rise under 100 MB for the dataset (issue 12).
 *
 * usage: npm run bench:upload [-- SIZE_MIB]
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { createWriteStream } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { BENCH_KEY, rssRise, s3Settings, startS3rver, startService } from "./server.js";
import { median } from "./stats.js";

const sizeMiB = Number(process.argv[2] ?? 1024);
const RUNS = 3;

async function writeCheckpoint(path: string): Promise<number> {
  const tensorBytes = 64 * 1024 * 1024;
  const count = Math.max(1, Math.round((sizeMiB * 1024 * 1024) / tensorBytes));
  const header: Record<string, unknown> = { __metadata__: { bench: "upload" } };
  for (let i = 0; i < count; i++) {
    header[`layers.${i}.weight`] = {
      dtype: "F32",
      shape: [tensorBytes / 4 / 1024, 1024],
      data_offsets: [i * tensorBytes, (i + 1) * tensorBytes],
    };
  }
  let text = JSON.stringify(header);
  text += " ".repeat((8 - (text.length % 8)) % 8);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(Buffer.byteLength(text)));
  const out = createWriteStream(path);
  out.write(prefix);
  out.write(text);
  const block = Buffer.alloc(4 * 1024 * 1024);
  for (let i = 0; i < block.length; i += 4) block.writeFloatLE(Math.sin(i), i);
  for (let written = 0; written < count * tensorBytes; written += block.length) {
    if (!out.write(block)) await once(out, "drain");
  }
  out.end();
  await once(out, "finish");
  return (await stat(path)).size;
}

/** An IDX dataset of about `sizeMiB` of 28x28 images: its four files' paths, by field. */
async function writeDataset(dir: string): Promise<Record<string, string>> {
  const count = Math.floor((sizeMiB * 1024 * 1024) / 784);
  const idxHeader = (dims: number[]) => {
    const header = Buffer.alloc(4 + 4 * dims.length);
    header.writeUInt8(8, 2);
    header.writeUInt8(dims.length, 3);
    for (const [i, d] of dims.entries()) header.writeUInt32BE(d, 4 + 4 * i);
    return header;
  };
  const write = async (name: string, dims: number[], bytes: number, fill: (i: number) => number) => {
    const path = join(dir, name);
    const out = createWriteStream(path);
    out.write(idxHeader(dims));
    const block = Buffer.alloc(1 << 20);
    for (let written = 0; written < bytes; written += block.length) {
      const n = Math.min(block.length, bytes - written);
      for (let i = 0; i < n; i++) block[i] = fill(written + i);
      if (!out.write(block.subarray(0, n))) await once(out, "drain");
    }
    out.end();
    await once(out, "finish");
    return path;
  };
  return {
    train_images: await write("train-images", [count, 28, 28], count * 784, (i) => i % 251),
    train_labels: await write("train-labels", [count], count, (i) => i % 10),
    test_images: await write("test-images", [100, 28, 28], 100 * 784, (i) => i % 7),
    test_labels: await write("test-labels", [100], 100, (i) => i % 10),
  };
}

/** curl as the client: a user's tool, and light enough not to starve the server of CPU. */
async function curlUpload(base: string, file: string): Promise<string> {
  return curl([
    "-H",
    "Content-Type: application/octet-stream",
    "-T",
    file,
    `${base}/v1/checkpoints?name=bench`,
  ]);
}

/** The dataset's files as one multipart/form-data POST, streamed by curl. */
function curlDataset(base: string, files: Record<string, string>): Promise<string> {
  return curl([
    ...Object.entries(files).flatMap(([field, path]) => ["-F", `${field}=@${path}`]),
    `${base}/v1/datasets?name=bench&format=idx`,
  ]);
}

async function curl(args: string[]): Promise<string> {
  const curl = spawn("curl", [
    "-s",
    "-o",
    "/dev/null",
    "-w",
    "%{http_code}",
    "-X",
    "POST",
    "-H",
    `Authorization: Bearer ${BENCH_KEY}`,
    ...args,
  ]);
  let out = "";
  curl.stdout.on("data", (d: Buffer) => {
    out += d.toString();
  });
  const [code] = await once(curl, "exit");
  if (code !== 0) throw new Error(`curl exited with ${code}`);
  return out;
}

const mbPerSecond = (bytes: number, started: number) => bytes / 1e6 / ((performance.now() - started) / 1000);

/** The `papa` CLI's resumable upload (presigned parts straight to S3, then the service's check). */
async function cliSessionUpload(base: string, file: string, stateDir: string): Promise<void> {
  const cli = spawn(
    process.execPath,
    [resolve("dist/cli.js"), "upload", file, "--name", "bench-session", "--resumable"],
    {
      cwd: stateDir,
      env: { PATH: process.env.PATH, HOME: stateDir, PAPA_URL: base, PAPA_API_KEY: BENCH_KEY },
      stdio: ["ignore", "ignore", "pipe"],
    },
  );
  let err = "";
  cli.stderr.on("data", (d: Buffer) => {
    err += d.toString();
  });
  const [code] = await once(cli, "exit");
  if (code !== 0) throw new Error(`papa upload exited with ${code}: ${err.slice(-500)}`);
}

/** The checkpoint RUNS times, (on S3) through an upload session, then the dataset, into one service on `store`. */
async function measure(store: "filesystem" | "s3", dir: string, file: string, size: number): Promise<void> {
  const s3 = store === "s3" ? await startS3rver(await mkdtemp(join(dir, "s3-"))) : null;
  const service = await startService(join(dir, `data-${store}`), {
    PAPA_MAX_DATASET_BYTES: String(2 * sizeMiB * 1024 * 1024),
    ...(s3 ? s3Settings(s3.endpoint).env : {}),
  });
  try {
    await new Promise((r) => setTimeout(r, 500));
    const runs: number[] = [];
    const rss = await rssRise(service.pid, async () => {
      for (let run = 0; run < RUNS; run++) {
        const started = performance.now();
        const status = await curlUpload(service.url, file);
        if (status !== "201") throw new Error(`upload answered ${status}`);
        runs.push(mbPerSecond(size, started));
      }
    });
    console.log(
      `upload store=${store} size_mib=${(size / 1048576).toFixed(0)} runs_MB/s=${runs.map((r) => r.toFixed(0)).join(",")} ` +
        `median_MB/s=${median(runs).toFixed(0)} ${rss}`,
    );
    if (s3) {
      let rate = 0;
      const sessionRss = await rssRise(service.pid, async () => {
        const started = performance.now();
        await cliSessionUpload(service.url, file, await mkdtemp(join(dir, "cli-")));
        rate = mbPerSecond(size, started);
      });
      console.log(
        `upload-session store=s3 client=papa-cli size_mib=${(size / 1048576).toFixed(0)} MB/s=${rate.toFixed(0)} ${sessionRss}`,
      );
    }
    const files = await writeDataset(dir);
    const datasetBytes = (await Promise.all(Object.values(files).map((f) => stat(f)))).reduce(
      (n, s) => n + s.size,
      0,
    );
    let rate = 0;
    const datasetRss = await rssRise(service.pid, async () => {
      const started = performance.now();
      const status = await curlDataset(service.url, files);
      if (status !== "201") throw new Error(`dataset upload answered ${status}`);
      rate = mbPerSecond(datasetBytes, started);
    });
    console.log(
      `dataset store=${store} size_mib=${(datasetBytes / 1048576).toFixed(0)} MB/s=${rate.toFixed(0)} ${datasetRss}`,
    );
    await Promise.all(Object.values(files).map((f) => rm(f)));
  } finally {
    await service.stop();
    await s3?.stop();
  }
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "papa-bench-"));
  try {
    const file = join(dir, "bench.safetensors");
    const size = await writeCheckpoint(file);
    for (const store of ["filesystem", "s3"] as const) await measure(store, dir, file, size);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
