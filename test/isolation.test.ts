import { monitorEventLoopDelay } from "node:perf_hooks";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startWorker } from "../src/jobs/worker.js";
import { type Harness, startHarness, TEST_WORKER } from "./helpers/harness.js";
import { type JobBody, waitForJob } from "./helpers/jobs.js";

// This file imports nothing that loads TensorFlow.js: the service's process must not either.

const json = (body: unknown) => ({
  method: "POST",
  body: JSON.stringify(body),
  headers: { "Content-Type": "application/json" },
});

/** A small CNN: on the cpu backend, each of its steps takes a good part of a second. */
const training = (epochs: number) => ({
  dataset: "mnist",
  max_train_examples: 128,
  max_test_examples: 32,
  model: { kind: "cnn", channels: [4] },
  population: { size: 2, variant: "papa-all", every_k_epochs: 1 },
  epochs,
  batch_size: 64,
});

describe("trainings run outside the service's process", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem", { worker: true });
  });
  afterAll(() => h.close());

  it("never load TensorFlow.js here, nor hold the event loop, while a CNN trains", async () => {
    const delay = monitorEventLoopDelay({ resolution: 10 });
    const created = (await (await h.request("/v1/trainings", json(training(2)))).json()) as JobBody;
    delay.enable();
    const job = await waitForJob(h, created.id, 120_000);
    delay.disable();
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    // Trained in this process, this CNN held the loop for seconds on end.
    expect(delay.max / 1e6).toBeLessThan(250);
    expect((globalThis as { _tfengine?: unknown })._tfengine).toBeUndefined();

    // An evaluated merge of its members runs out of process too.
    const members = (job.result?.checkpoints ?? []).slice(0, 2).map((c) => c.id);
    const merge = (await (
      await h.request(
        "/v1/merges",
        json({ method: "papa-all", inputs: members, evaluate: { dataset: "mnist", max_test_examples: 64 } }),
      )
    ).json()) as JobBody;
    const merged = await waitForJob(h, merge.id, 120_000);
    expect(merged.status, JSON.stringify(merged.problem)).toBe("succeeded");
    expect(merged.result?.checkpoints[0]).toHaveProperty("accuracy");
    expect((globalThis as { _tfengine?: unknown })._tfengine).toBeUndefined();
  });

  it("fails only the attempt whose training process crashes; the retry and the service go on", async () => {
    const created = (await (await h.request("/v1/trainings", json(training(3)))).json()) as JobBody;
    let pid: number | undefined;
    while (pid === undefined) {
      await new Promise((r) => setTimeout(r, 20));
      const line = h.logs.find(
        (l) => l.includes('"msg":"training process started"') && l.includes(created.id),
      );
      pid = line ? (JSON.parse(line) as { pid: number }).pid : undefined;
    }
    process.kill(pid, "SIGKILL"); // as the kernel's out-of-memory killer would
    const job = await waitForJob(h, created.id, 120_000);
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    const failed = h.logs.filter((l) => l.includes('"msg":"job attempt failed"') && l.includes(created.id));
    expect(failed).toHaveLength(1);
    expect(failed[0]).toContain("SIGKILL");
    expect((await h.request("/healthz", { key: null })).status).toBe(200);
  });
});

describe("a training backend that cannot run", () => {
  it("is reported by /readyz, and its worker takes no training", async () => {
    const h = await startHarness("pglite", "filesystem");
    try {
      await startWorker(h.ctx, { ...TEST_WORKER, backend: "tensorflow" }); // tfjs-node is not installed here
      const ready = await h.request("/readyz", { key: null });
      expect(ready.status).toBe(503);
      expect(((await ready.json()) as { detail: string }).detail).toContain(
        "tensorflow backend could not be loaded",
      );
      const created = (await (await h.request("/v1/trainings", json(training(1)))).json()) as JobBody;
      await new Promise((r) => setTimeout(r, 1500));
      expect(((await (await h.request(`/v1/jobs/${created.id}`)).json()) as JobBody).status).toBe("queued");
    } finally {
      await h.close();
    }
  });
});
