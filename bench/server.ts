import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { readFile } from "node:fs/promises";
import type { Readable } from "node:stream";
import pg from "pg";
import type { S3StoreOptions } from "../src/storage/object-store.js";

/**
 * The URL a starting server logs once it listens (its JSON log line `listening`). Its later
 * output is read and dropped, so that its logs neither fill the pipe nor cost the benchmark.
 */
export function listeningUrl(server: ChildProcess & { stdout: Readable }): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = "";
    const read = (d: Buffer) => {
      out += d.toString();
      const url = out.match(/"msg":"listening","url":"([^"]+)"/)?.[1];
      if (!url) return;
      server.stdout.off("data", read);
      server.stdout.resume();
      resolve(url);
    };
    server.stdout.on("data", read);
    server.on("exit", (code) => reject(new Error(`server exited with ${code}`)));
  });
}

/** The API key benchmarks give the services they start (`PAPA_API_KEY`). */
export const BENCH_KEY = "papa_bench-key-0123456789abcdefghijklmnop";

/**
 * The compiled service (`node dist/server.js`) on 127.0.0.1, any port, its data under `dataDir`,
 * `BENCH_KEY` its API key, with `env`'s variables besides: its URL once it listens, and `stop`.
 */
export async function startService(
  dataDir: string,
  env: Record<string, string>,
): Promise<{ url: string; pid: number; stop(): Promise<void> }> {
  const server = spawn(process.execPath, ["dist/server.js"], {
    env: {
      PATH: process.env.PATH,
      PORT: "0",
      HOST: "127.0.0.1",
      PAPA_DATA_DIR: dataDir,
      PAPA_API_KEY: BENCH_KEY,
      ...env,
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const stop = async () => {
    if (server.exitCode === null) {
      server.kill();
      await once(server, "exit");
    }
  };
  try {
    return { url: await listeningUrl(server), pid: server.pid ?? 0, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** The Postgres server benchmarks make their databases on (DATABASE_URL's). */
const adminUrl = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test";

async function admin(sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end();
  }
}

/** A new, empty database next to DATABASE_URL's: its URL, and `drop` to remove it. */
export async function freshDatabase(): Promise<{ url: string; drop(): Promise<void> }> {
  const name = `papa_bench_${process.pid}_${Date.now()}`;
  await admin(`create database ${name}`);
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  return { url: url.toString(), drop: () => admin(`drop database if exists ${name} with (force)`) };
}

/** s3rver in a process of its own (as S3 is to the service): its endpoint, and `stop`. */
export async function startS3rver(dir: string): Promise<{ endpoint: string; stop(): Promise<void> }> {
  const server = spawn(
    process.execPath,
    [
      "node_modules/s3rver/bin/s3rver.js",
      "-d",
      dir,
      "-a",
      "127.0.0.1",
      "-p",
      "0",
      "-s",
      "--configure-bucket",
      "bench",
    ],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  let out = "";
  for await (const chunk of server.stdout) {
    out += String(chunk);
    const address = out.match(/listening on (\S+)/)?.[1];
    if (address) {
      server.stdout.resume();
      return {
        endpoint: `http://${address}`,
        stop: async () => {
          server.kill();
          await once(server, "exit");
        },
      };
    }
  }
  throw new Error(`s3rver did not start: ${out}`);
}

/** The S3 settings of the bench bucket on `endpoint`, as the service reads them and as `S3Store` takes them. */
export function s3Settings(endpoint: string) {
  const env = {
    S3_BUCKET: "bench",
    S3_ENDPOINT: endpoint,
    S3_FORCE_PATH_STYLE: "true",
    S3_ACCESS_KEY_ID: "S3RVER",
    S3_SECRET_ACCESS_KEY: "S3RVER",
  };
  const options: S3StoreOptions = {
    bucket: env.S3_BUCKET,
    region: "us-east-1",
    endpoint,
    forcePathStyle: true,
    credentials: { accessKeyId: env.S3_ACCESS_KEY_ID, secretAccessKey: env.S3_SECRET_ACCESS_KEY },
  };
  return { env, options };
}

/** A process's resident memory in MiB (Linux's /proc). */
export async function rssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  return Number(status.match(/VmRSS:\s+(\d+) kB/)?.[1] ?? 0) / 1024;
}

/** The server's RSS sampled every 20 ms from now: the figures of `during`'s work. */
export async function rssRise(pid: number, during: () => Promise<void>): Promise<string> {
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
  try {
    await during();
  } finally {
    clearInterval(sampler);
  }
  peak = Math.max(peak, await rssMiB(pid));
  return `server_rss_before_mib=${before.toFixed(0)} server_rss_peak_mib=${peak.toFixed(0)} rss_rise_mib=${(peak - before).toFixed(0)}`;
}
