/**
 * The CNN experiment (bench:cnn's network and settings) through the service, trained by 1 and by
 * N worker processes (issue 14): Postgres (a fresh database on DATABASE_URL's server), the
 * filesystem store, an API process without a worker, and N worker processes on both queues
 * (`node --import tsx src/worker.ts`; the rounds' merges run on them too). With N > 1 the
 * training is placed (`placement: {workers: N}`). Prints, per variant and worker count, the wall
 * time from the POST to the job's success and the accuracy table, then each speedup.
 * Target: 2 workers at least 1.7x faster than 1, the same accuracies within noise.
 * With REPEATS > 1 the worker counts take turns (1, 2, 1, 2, ...): this 2-core machine's speed
 * drifts by 10-30 % within minutes, and the two-worker runs feel it most, so each repeat's
 * ratio is of two runs minutes apart, and the median of the repeats' ratios is printed too.
 *
 * usage: npm run bench:placement [-- MAX_TRAIN [EPOCHS [VARIANTS [WORKERS [SIZE [REPEATS]]]]]]
 *   default: 6000 4 papa-all,papa 1,2 4 1
 * Reads DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test: a database is made next
 * to it, and dropped), PAPA_FASHION_MNIST_DIR and PAPA_BACKEND as the service does.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { createWriteStream } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BENCH_KEY, freshDatabase, listeningUrl } from "./server.js";
import { median } from "./stats.js";

const maxTrain = Number(process.argv[2] ?? 6000);
const epochs = Number(process.argv[3] ?? 4);
const variants = (process.argv[4] ?? "papa-all,papa").split(",");
const workerCounts = (process.argv[5] ?? "1,2").split(",").map(Number);
const size = Number(process.argv[6] ?? 4);
const repeats = Number(process.argv[7] ?? 1);

interface Result {
  members: { accuracy: number }[];
  ensemble_accuracy: number;
  uniform_soup: { accuracy: number };
  greedy_soup: { accuracy: number; members: string[] };
  seconds: { load: number; train: number; evaluate: number };
}

const pct = (x: number) => (100 * x).toFixed(2);

function start(
  script: string,
  env: Record<string, string>,
): ChildProcess & { stdout: NonNullable<ChildProcess["stdout"]> } {
  const passed = ["PATH", "PAPA_FASHION_MNIST_DIR", "PAPA_BACKEND"].flatMap((k) =>
    process.env[k] === undefined ? [] : [[k, process.env[k] as string]],
  );
  return spawn(process.execPath, ["--import", "tsx", script], {
    env: { ...Object.fromEntries(passed), ...env },
    stdio: ["ignore", "pipe", "inherit"],
  }) as ChildProcess & { stdout: NonNullable<ChildProcess["stdout"]> };
}

/** Resolves once the process's output has a line with `text`. */
function logged(
  process: ChildProcess & { stdout: NonNullable<ChildProcess["stdout"]> },
  text: string,
): Promise<void> {
  return new Promise((resolve, reject) => {
    let out = "";
    process.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes(text)) resolve();
    });
    process.on("exit", (code) => reject(new Error(`exited with ${code} before logging ${text}`)));
  });
}

/**
 * One training of `variant` by `workers` worker processes: its wall time and result. The
 * processes' logs go to `papa-bench-placement-VARIANT-Nw-*.log` in the temp directory.
 */
async function run(variant: string, workers: number): Promise<{ seconds: number; result: Result }> {
  const dir = await mkdtemp(join(tmpdir(), "papa-bench-placement-"));
  const logs = join(tmpdir(), `papa-bench-placement-${variant}-${workers}w`);
  const database = await freshDatabase();
  const shared = { DATABASE_URL: database.url, PAPA_DATA_DIR: dir, PAPA_API_KEY: BENCH_KEY };
  const server = start("src/server.ts", {
    ...shared,
    PORT: "0",
    HOST: "127.0.0.1",
    PAPA_IN_PROCESS_WORKER: "false",
  });
  const processes = [server];
  try {
    const base = await listeningUrl(server);
    server.stdout.pipe(createWriteStream(`${logs}-server.log`));
    const ready: Promise<unknown>[] = [];
    for (let w = 0; w < workers; w++) {
      const worker = start("src/worker.ts", shared);
      processes.push(worker);
      worker.stdout.pipe(createWriteStream(`${logs}-worker-${w}.log`));
      ready.push(logged(worker, '"msg":"worker started"'));
    }
    // The clock starts once every worker has probed its backend and listens.
    await Promise.all(ready);
    const auth = { Authorization: `Bearer ${BENCH_KEY}`, "Content-Type": "application/json" };
    const started = performance.now();
    const created = await fetch(`${base}/v1/trainings`, {
      method: "POST",
      headers: auth,
      body: JSON.stringify({
        dataset: "fashion-mnist",
        max_train_examples: maxTrain,
        max_test_examples: 10_000,
        model: { kind: "cnn", channels: [32, 64] },
        population: { size, variant, seed: 1, alpha: 0.99, every_k_steps: 10, every_k_epochs: 2 },
        diversity: {
          mixup: [0, 0.5, 1.0],
          label_smoothing: [0, 0.05, 0.1],
          cutmix: [0, 0.5, 1.0],
          random_erasing: [0, 0.15, 0.35],
        },
        optimizer: { lr: 0.05, warmup_steps: Math.ceil((maxTrain * 0.98) / 128) },
        epochs,
        batch_size: 128,
        ...(workers > 1 ? { placement: { workers } } : {}),
      }),
    });
    if (created.status !== 202)
      throw new Error(`POST /v1/trainings: ${created.status} ${await created.text()}`);
    const { id } = (await created.json()) as { id: string };
    for (;;) {
      await new Promise((r) => setTimeout(r, 1000));
      const job = (await (await fetch(`${base}/v1/jobs/${id}`, { headers: auth })).json()) as {
        status: string;
        result: Result;
        problem: unknown;
      };
      if (job.status === "succeeded")
        return { seconds: (performance.now() - started) / 1000, result: job.result };
      if (job.status === "failed" || job.status === "canceled") {
        throw new Error(`training ${job.status}: ${JSON.stringify(job.problem)}`);
      }
    }
  } finally {
    for (const p of processes) p.kill("SIGTERM");
    await Promise.all(processes.map((p) => (p.exitCode === null ? once(p, "exit") : undefined)));
    await database.drop();
    await rm(dir, { recursive: true, force: true });
  }
}

console.log(
  `# fashion-mnist CNN through the service: ${maxTrain} train examples, ${epochs} epochs, population ${size}, ` +
    `workers ${workerCounts.join(" and ")}, ${repeats} repeat(s), Postgres + filesystem store`,
);
console.log(
  "| variant | workers | members mean | min | max | ensemble | uniform soup | greedy soup | POST to success s | lead's load / train / evaluate s |",
);
console.log("|---|---|---|---|---|---|---|---|---|---|");
/** Wall times by variant and worker count, one per repeat. */
const walls = new Map<string, number[]>();
for (let repeat = 0; repeat < repeats; repeat++) {
  for (const variant of variants) {
    for (const workers of workerCounts) {
      const { seconds, result: r } = await run(variant, workers);
      walls.set(`${variant}/${workers}`, [...(walls.get(`${variant}/${workers}`) ?? []), seconds]);
      const acc = r.members.map((m) => m.accuracy);
      console.log(
        `| ${variant} | ${workers} | ${pct(acc.reduce((a, b) => a + b, 0) / acc.length)} | ${pct(Math.min(...acc))} | ${pct(Math.max(...acc))} | ` +
          `${pct(r.ensemble_accuracy)} | ${pct(r.uniform_soup.accuracy)} | ${pct(r.greedy_soup.accuracy)} (${r.greedy_soup.members.length} of ${acc.length}) | ${seconds.toFixed(1)} | ` +
          `${r.seconds.load.toFixed(1)} / ${r.seconds.train.toFixed(1)} / ${r.seconds.evaluate.toFixed(1)} |`,
      );
    }
  }
}
for (const variant of variants) {
  const one = walls.get(`${variant}/${workerCounts[0]}`) ?? [];
  for (const workers of workerCounts.slice(1)) {
    const ratios = (walls.get(`${variant}/${workers}`) ?? []).map((wall, i) => (one[i] ?? Number.NaN) / wall);
    console.log(
      `placement_speedup variant=${variant} workers=${workers} vs=${workerCounts[0]} ` +
        `ratio=${median(ratios).toFixed(2)} repeats=${ratios.map((x) => x.toFixed(2)).join(",")}`,
    );
  }
}
