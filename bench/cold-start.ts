/**
 * Cold start (issue 16), from the compiled service (`npm run build`): for the API process
 * (`node dist/server.js`), the time from spawning it to its first answered request (GET
 * /healthz); for the Lambda handler, the process's own clock: Node's start,
 * the handler's import, and its first invocation (GET /healthz through an API Gateway v2 event),
 * which builds the service context; the handler both as tsc's modules (`dist/lambda.js`) and as
 * the bundle a deployment runs (`dist/bundle/lambda.js`, `npm run build:lambda`). Each on the
 * embedded default (PGlite and the filesystem store in a data dir) and on Postgres (a fresh
 * database on DATABASE_URL's server) with s3rver, migrated by a first start that is not
 * counted; the API process also with its in-process worker. Prints the median of RUNS runs, and
 * whether the Lambda process loaded TensorFlow.js (its engine in the global namespace), and each
 * process's resident memory once it answered.
 * Target: the Lambda handler's init (import and first invocation) under 500 ms.
 *
 * usage: npm run bench:cold [-- RUNS]   (default 5)
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import S3rver from "s3rver";
import { BENCH_KEY, freshDatabase, listeningUrl, rssMiB } from "./server.js";
import { median } from "./stats.js";

const runs = Number(process.argv[2] ?? 5);

type Env = Record<string, string>;

/**
 * Runs `measure` RUNS times on one deployment of `setup` (a data dir, and on Postgres + S3 a
 * fresh database), after a first start that migrates it and is not counted: a cold start meets
 * a deployment whose migrations have run. Cleans up after.
 */
async function deployment<T>(
  setup: "embedded" | "postgres+s3",
  s3: string,
  measure: (env: Env) => Promise<T>,
): Promise<T[]> {
  const dir = await mkdtemp(join(tmpdir(), "papa-bench-cold-"));
  const env: Env = { PATH: process.env.PATH ?? "", PAPA_DATA_DIR: dir, PAPA_API_KEY: BENCH_KEY };
  const database = setup === "postgres+s3" ? await freshDatabase() : null;
  if (database) {
    Object.assign(env, {
      DATABASE_URL: database.url,
      S3_BUCKET: "bench",
      S3_ENDPOINT: s3,
      S3_FORCE_PATH_STYLE: "true",
      S3_ACCESS_KEY_ID: "S3RVER",
      S3_SECRET_ACCESS_KEY: "S3RVER",
    });
  }
  try {
    await measure(env);
    const results: T[] = [];
    for (let r = 0; r < runs; r++) results.push(await measure(env));
    return results;
  } finally {
    await database?.drop();
    await rm(dir, { recursive: true, force: true });
  }
}

/** Milliseconds from spawning the API process to its first answer to GET /healthz, and its RSS then. */
async function serverStart(env: Env): Promise<{ ms: number; rss: number }> {
  const started = performance.now();
  const server = spawn(process.execPath, ["dist/server.js"], {
    env: { ...env, PORT: "0", HOST: "127.0.0.1" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  try {
    const base = await listeningUrl(server);
    const res = await fetch(`${base}/healthz`);
    if (!res.ok) throw new Error(`/healthz: ${res.status}`);
    const ms = performance.now() - started;
    return { ms, rss: await rssMiB(server.pid ?? 0) };
  } finally {
    server.kill("SIGTERM");
    if (server.exitCode === null) await once(server, "exit");
  }
}

/** What the Lambda process measures on its own clock (ms since its start). */
interface LambdaInit {
  node: number;
  imported: number;
  answered: number;
  status: number;
  tfjs: boolean;
  /** Resident memory once it answered, MiB. */
  rss: number;
}

/** The handler's modules as tsc compiled them, and the bundle `npm run build:lambda` makes of them. */
const ENTRIES = {
  modules: new URL("../dist/lambda.js", import.meta.url).href,
  bundle: new URL("../dist/bundle/lambda.js", import.meta.url).href,
} as const;

const lambdaProbe = (entry: string) => `
const node = performance.now();
const { handler } = await import(${JSON.stringify(entry)});
const imported = performance.now();
const http = { method: "GET", path: "/healthz", protocol: "HTTP/1.1", sourceIp: "127.0.0.1", userAgent: "bench" };
const reply = await handler({
  version: "2.0", routeKey: "$default", rawPath: "/healthz", rawQueryString: "",
  headers: { host: "bench.example" }, isBase64Encoded: false,
  requestContext: { accountId: "0", apiId: "bench", domainName: "bench.example", domainPrefix: "bench", http,
    requestId: "cold", routeKey: "$default", stage: "$default", time: "", timeEpoch: Date.now() },
}, {});
const answered = performance.now();
const rss = process.memoryUsage().rss / 1048576;
process.stdout.write(JSON.stringify({ node, imported, answered, status: reply.statusCode, tfjs: "_tfengine" in globalThis, rss }));
process.exit(0);
`;

/** The Lambda handler's init in a new process, as its own clock measures it. */
async function lambdaInit(entry: string, env: Env): Promise<LambdaInit> {
  // A file, not `-e`: worker threads inherit the process's flags, and `--input-type` fails them.
  const dir = await mkdtemp(join(tmpdir(), "papa-lambda-probe-"));
  const file = join(dir, "probe.mjs");
  await writeFile(file, lambdaProbe(entry));
  const probe = spawn(process.execPath, [file], {
    env: { ...env, PAPA_IN_PROCESS_WORKER: "false" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  let out = "";
  probe.stdout.on("data", (d: Buffer) => {
    out += d.toString();
  });
  const [code] = await once(probe, "exit");
  await rm(dir, { recursive: true, force: true });
  if (code !== 0) throw new Error(`the Lambda probe exited with ${code}`);
  const init = JSON.parse(out.slice(out.lastIndexOf("{"))) as LambdaInit;
  if (init.status !== 200) throw new Error(`the Lambda's /healthz: ${init.status}`);
  return init;
}

const s3dir = await mkdtemp(join(tmpdir(), "papa-bench-cold-s3-"));
const s3rver = new S3rver({
  port: 0,
  address: "127.0.0.1",
  silent: true,
  directory: s3dir,
  configureBuckets: [{ name: "bench", configs: [] }],
});
const { port } = (await s3rver.run()) as { port: number };
const s3 = `http://127.0.0.1:${port}`;
try {
  console.log(`# cold start, median of ${runs} runs (ms)`);
  console.log(
    "| process | setup | Node started | handler imported | first answer | TF.js loaded | RSS then, MiB |",
  );
  console.log("|---|---|---|---|---|---|---|");
  const setups = ["embedded", "postgres+s3"] as const;
  for (const setup of setups) {
    for (const [form, entry] of Object.entries(ENTRIES)) {
      const inits = await deployment(setup, s3, (env) => lambdaInit(entry, env));
      const at = (k: "node" | "imported" | "answered" | "rss") => median(inits.map((i) => i[k])).toFixed(0);
      const tfjs = inits.some((i) => i.tfjs) ? "yes" : "no";
      console.log(
        `| Lambda handler (${form}) | ${setup} | ${at("node")} | ${at("imported")} | ${at("answered")} | ${tfjs} | ${at("rss")} |`,
      );
    }
  }
  const servers = [
    ["embedded, in-process worker", "embedded", {}],
    ["embedded, API only", "embedded", { PAPA_IN_PROCESS_WORKER: "false" }],
    ["postgres+s3, API only", "postgres+s3", { PAPA_IN_PROCESS_WORKER: "false" }],
  ] as const;
  for (const [label, setup, extra] of servers) {
    const starts = await deployment(setup, s3, (env) => serverStart({ ...env, ...extra }));
    const ms = median(starts.map((s) => s.ms)).toFixed(0);
    const rss = median(starts.map((s) => s.rss)).toFixed(0);
    console.log(`| API process (spawn to answer) | ${label} | - | - | ${ms} | - | ${rss} |`);
  }
} finally {
  await s3rver.close();
  await rm(s3dir, { recursive: true, force: true });
}
