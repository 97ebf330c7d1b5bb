/**
 * /healthz while a CNN trains, on the embedded default (one process: API, PGlite, filesystem
 * store, the in-process worker). Starts `src/server.ts` of a checkout (this one, or another with
 * `--checkout DIR`, to measure an earlier version on the same machine), submits a training of a
 * small CNN (2 members, channels 16-32, 4000 MNIST digits, 3 epochs), and asks /healthz every
 * 50 ms until the training has finished: the latencies' p50, p99 and max.
 * Target (issue 12): p99 under 100 ms.
 *
 * usage: npm run bench:health [-- --checkout DIR]
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { BENCH_KEY, listeningUrl } from "./server.js";

const { values } = parseArgs({ options: { checkout: { type: "string" } } });
const checkout = resolve(values.checkout ?? ".");

const percentile = (sorted: number[], p: number) =>
  sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? Number.NaN;

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "papa-health-"));
  const server = spawn(process.execPath, ["--import", "tsx", "src/server.ts"], {
    cwd: checkout,
    env: {
      PATH: process.env.PATH,
      PORT: "0",
      HOST: "127.0.0.1",
      PAPA_DATA_DIR: dir,
      PAPA_API_KEY: BENCH_KEY,
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  try {
    const base = await listeningUrl(server);
    const auth = { Authorization: `Bearer ${BENCH_KEY}`, "Content-Type": "application/json" };
    const created = await fetch(`${base}/v1/trainings`, {
      method: "POST",
      headers: auth,
      body: JSON.stringify({
        dataset: "mnist",
        max_train_examples: 4000,
        max_test_examples: 500,
        model: { kind: "cnn", channels: [16, 32] },
        population: { size: 2, variant: "papa-all", every_k_epochs: 1 },
        epochs: 3,
        batch_size: 64,
      }),
    });
    const { id } = (await created.json()) as { id: string };
    const started = performance.now();
    const latencies: number[] = [];
    let status = "queued";
    let lastCheck = 0;
    while (!["succeeded", "failed", "canceled"].includes(status)) {
      const t0 = performance.now();
      await (await fetch(`${base}/healthz`)).arrayBuffer();
      latencies.push(performance.now() - t0);
      if (performance.now() - lastCheck > 1000) {
        lastCheck = performance.now();
        status = (
          (await (await fetch(`${base}/v1/jobs/${id}`, { headers: auth })).json()) as { status: string }
        ).status;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    const sorted = [...latencies].sort((a, b) => a - b);
    console.log(
      `health_during_training checkout=${checkout} job=${status} train_s=${((performance.now() - started) / 1000).toFixed(1)} ` +
        `requests=${sorted.length} p50_ms=${percentile(sorted, 50).toFixed(1)} p99_ms=${percentile(sorted, 99).toFixed(1)} ` +
        `max_ms=${(sorted.at(-1) ?? Number.NaN).toFixed(1)}`,
    );
  } finally {
    server.kill("SIGTERM");
    await once(server, "exit");
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
