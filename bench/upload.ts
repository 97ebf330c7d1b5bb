/**
 * Upload benchmark: a 1 GiB safetensors checkpoint through the API into the filesystem store,
 * then a 1 GiB dataset (IDX images, multipart/form-data). Starts the built server
 * (`dist/server.js`) on embedded defaults in a temp dir, streams the checkpoint over HTTP with
 * curl three times and the dataset once, and samples the server's RSS every 20 ms throughout.
 * The disk's write speed varies run to run on shared machines: read all three numbers.
 * Targets: at least 200 MB/s and a server peak RSS rise under 100 MB for the checkpoint (issue 2);
 * an RSS rise under 100 MB for the dataset (issue 12).
 *
 * usage: npm run bench:upload [-- SIZE_MIB]
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { createWriteStream } from "node:fs";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { listeningUrl } from "./server.js";

const sizeMiB = Number(process.argv[2] ?? 1024);
const RUNS = 3;
const KEY = "papa_bench-key-0123456789abcdefghijklmnop";

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
    `Authorization: Bearer ${KEY}`,
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

async function rssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  return Number(status.match(/VmRSS:\s+(\d+) kB/)?.[1] ?? 0) / 1024;
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "papa-bench-"));
  try {
    const file = join(dir, "bench.safetensors");
    const size = await writeCheckpoint(file);
    const server = spawn(
      process.execPath,
      [...(process.env.BENCH_NODE_ARGS ?? "").split(" ").filter(Boolean), "dist/server.js"],
      {
        env: {
          PATH: process.env.PATH,
          PORT: "0",
          HOST: "127.0.0.1",
          PAPA_DATA_DIR: join(dir, "data"),
          PAPA_API_KEY: KEY,
          PAPA_MAX_DATASET_BYTES: String(2 * sizeMiB * 1024 * 1024),
        },
        stdio: ["ignore", "pipe", "inherit"],
      },
    );
    const base = await listeningUrl(server);
    const pid = server.pid ?? 0;
    await new Promise((r) => setTimeout(r, 500));
    const before = await rssMiB(pid);
    let peak = before;
    const sampler = setInterval(() => {
      rssMiB(pid).then(
        (v) => {
          peak = Math.max(peak, v);
        },
        () => undefined,
      );
    }, 20);

    const runs: number[] = [];
    for (let run = 0; run < RUNS; run++) {
      const started = performance.now();
      const status = await curlUpload(base, file);
      if (status !== "201") throw new Error(`upload answered ${status}`);
      runs.push(size / 1e6 / ((performance.now() - started) / 1000));
    }
    peak = Math.max(peak, await rssMiB(pid));
    const sorted = [...runs].sort((a, b) => a - b);
    console.log(
      `upload size_mib=${(size / 1048576).toFixed(0)} runs_MB/s=${runs.map((r) => r.toFixed(0)).join(",")} ` +
        `median_MB/s=${(sorted[Math.floor(sorted.length / 2)] ?? 0).toFixed(0)} ` +
        `server_rss_before_mib=${before.toFixed(0)} server_rss_peak_mib=${peak.toFixed(0)} rss_rise_mib=${(peak - before).toFixed(0)}`,
    );

    await rm(file);
    const files = await writeDataset(dir);
    const datasetBytes = (await Promise.all(Object.values(files).map((f) => stat(f)))).reduce(
      (n, s) => n + s.size,
      0,
    );
    const datasetBefore = await rssMiB(pid);
    peak = datasetBefore;
    const started = performance.now();
    const status = await curlDataset(base, files);
    if (status !== "201") throw new Error(`dataset upload answered ${status}`);
    const seconds = (performance.now() - started) / 1000;
    clearInterval(sampler);
    peak = Math.max(peak, await rssMiB(pid));
    console.log(
      `dataset size_mib=${(datasetBytes / 1048576).toFixed(0)} MB/s=${(datasetBytes / 1e6 / seconds).toFixed(0)} ` +
        `server_rss_before_mib=${datasetBefore.toFixed(0)} server_rss_peak_mib=${peak.toFixed(0)} rss_rise_mib=${(peak - datasetBefore).toFixed(0)}`,
    );
    server.kill("SIGTERM");
    await once(server, "exit");
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
