import * as tf from "@tensorflow/tfjs";
import { eq } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { schema } from "../src/db/client.js";
import { expectDocumented } from "./helpers/contract.js";
import { type Harness, startHarness, upload } from "./helpers/harness.js";
import { type JobBody, waitForJob } from "./helpers/jobs.js";
import { smallCheckpoint } from "./helpers/safetensors.js";

interface TrainingResult {
  checkpoints: { id: string; name: string }[];
  backend: string;
  members: {
    checkpoint_id: string;
    accuracy: number;
    held_out_accuracy: number;
    diversity: Record<string, number>;
  }[];
  ensemble_accuracy: number;
  uniform_soup: { checkpoint_id: string; accuracy: number };
  greedy_soup: { checkpoint_id: string; accuracy: number; members: string[] };
  seconds: Record<string, number>;
}

const quick = {
  dataset: "mnist",
  max_train_examples: 300,
  max_test_examples: 100,
  model: { kind: "mlp", hidden: [32] },
  population: { size: 2, variant: "papa", every_k_steps: 2, seed: 4 },
  diversity: { label_smoothing: [0, 0.1] },
  optimizer: { lr: 0.1, warmup_steps: 3 },
  epochs: 1,
  batch_size: 32,
  name: "quick",
};

function postTraining(h: Harness, body: object) {
  return h.request("/v1/trainings", {
    method: "POST",
    body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" },
  });
}

describe("training jobs", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem", { worker: true });
  });
  afterAll(() => h.close());

  it("trains a PAPA population on MNIST and registers members, soups, metrics and lineage", async () => {
    const res = await postTraining(h, quick);
    expect(res.status).toBe(202);
    const created = (await expectDocumented("createTraining", res)) as JobBody;
    const job = await waitForJob(h, created.id, 120_000);
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    const documented = (await expectDocumented("getJob", await h.request(`/v1/jobs/${job.id}`))) as {
      result: TrainingResult;
      progress_detail: Record<string, number>;
    };
    const result = documented.result;
    expect(result.backend).toBe("cpu");
    expect(result.members).toHaveLength(2);
    expect(new Set(result.members.map((m) => JSON.stringify(m.diversity))).size).toBe(2);
    for (const m of result.members) expect(m.accuracy).toBeGreaterThan(0.3);
    expect(result.ensemble_accuracy).toBeGreaterThan(0.3);
    expect(result.checkpoints).toHaveLength(4);
    expect(result.seconds.train).toBeGreaterThan(0);
    expect(documented.progress_detail.steps).toBeGreaterThan(0);

    const soup = (await (await h.request(`/v1/checkpoints/${result.uniform_soup.checkpoint_id}`)).json()) as {
      name: string;
      has_topology: boolean;
      metrics: { dataset: string; split: string; name: string; value: number }[];
      parents: { checkpoint_id: string; coefficient: number; method: string }[];
    };
    expect(soup.name).toBe("quick-uniform-soup");
    expect(soup.has_topology).toBe(true);
    expect(soup.metrics).toMatchObject([
      { dataset: "mnist", split: "test", name: "accuracy", value: result.uniform_soup.accuracy },
    ]);
    expect(soup.parents.map((p) => [p.coefficient, p.method])).toEqual([
      [0.5, "uniform-soup"],
      [0.5, "uniform-soup"],
    ]);
    const greedy = (await (
      await h.request(`/v1/checkpoints/${result.greedy_soup.checkpoint_id}/lineage`)
    ).json()) as {
      edges: { parent_id: string; coefficient: number }[];
    };
    expect(greedy.edges.map((e) => e.parent_id).sort()).toEqual([...result.greedy_soup.members].sort());

    // Load the soup with TensorFlow.js from its URL; the weights are the safetensors data section.
    const auth = { Authorization: `Bearer ${h.keyA}` };
    const base = `http://papa.test/v1/checkpoints/${result.uniform_soup.checkpoint_id}`;
    const fetchFunc = async (input: string | URL | Request, init?: RequestInit) =>
      h.app.request(String(input).replace("http://papa.test", ""), { ...init, headers: { ...auth } });
    const modelJson = await h.request(`/v1/checkpoints/${result.uniform_soup.checkpoint_id}/tfjs/model.json`);
    await expectDocumented("getCheckpointTfjsModel", modelJson);
    const model = await tf.loadLayersModel(tf.io.http(`${base}/tfjs/model.json`, { fetchFunc }));
    const out = model.predict(tf.zeros([3, 28, 28, 1])) as tf.Tensor;
    expect(out.shape).toEqual([3, 10]);
    const weights = Buffer.from(
      await (
        await h.request(`/v1/checkpoints/${result.uniform_soup.checkpoint_id}/tfjs/weights.bin`)
      ).arrayBuffer(),
    );
    const file = Buffer.from(
      await (await h.request(`/v1/checkpoints/${result.uniform_soup.checkpoint_id}/weights`)).arrayBuffer(),
    );
    expect(weights.equals(file.subarray(file.length - weights.length))).toBe(true);
    const kernel = model.getLayer("dense_0").getWeights()[0]?.dataSync() as Float32Array;
    expect(
      Buffer.from(kernel.buffer, kernel.byteOffset, kernel.byteLength).equals(
        weights.subarray(0, kernel.byteLength),
      ),
    ).toBe(true);
    model.dispose();
    out.dispose();

    // An evaluated merge of the two members: BatchNorm re-estimated, accuracy recorded.
    const merge = await h.request("/v1/merges", {
      method: "POST",
      body: JSON.stringify({
        method: "papa-all",
        inputs: result.members.map((m) => m.checkpoint_id),
        name: "evaluated",
        evaluate: { dataset: "mnist", max_train_examples: 300, max_test_examples: 100 },
      }),
      headers: { "Content-Type": "application/json" },
    });
    expect(merge.status).toBe(202);
    const merged = await waitForJob(h, ((await merge.json()) as JobBody).id, 60_000);
    expect(merged.status, JSON.stringify(merged.problem)).toBe("succeeded");
    const [child] = merged.result?.checkpoints ?? [];
    const shown = (await (await h.request(`/v1/checkpoints/${child?.id}`)).json()) as {
      has_topology: boolean;
      metrics: { name: string; value: number }[];
      parents: { coefficient: number }[];
    };
    expect(shown.has_topology).toBe(true);
    expect(shown.metrics[0]?.name).toBe("accuracy");
    expect(shown.metrics[0]?.value).toBe((child as { accuracy?: number } | undefined)?.accuracy);
    expect(shown.parents.map((p) => p.coefficient)).toEqual([0.5, 0.5]);

    // A member whose topology names a layer its weights do not have cannot be imported, and no
    // retry can change that: the job fails at its first attempt (none retried), naming the weight.
    const [broken] = result.members;
    const [row] = await h.ctx.db
      .select({ topology: schema.checkpoints.topology })
      .from(schema.checkpoints)
      .where(eq(schema.checkpoints.id, broken?.checkpoint_id ?? ""));
    const renamed = JSON.parse(JSON.stringify(row?.topology).replaceAll('"dense_0"', '"dense_renamed"'));
    await h.ctx.db
      .update(schema.checkpoints)
      .set({ topology: renamed })
      .where(eq(schema.checkpoints.id, broken?.checkpoint_id ?? ""));
    const again = await h.request("/v1/merges", {
      method: "POST",
      body: JSON.stringify({
        method: "papa-all",
        inputs: result.members.map((m) => m.checkpoint_id),
        evaluate: { dataset: "mnist", max_train_examples: 300, max_test_examples: 100 },
      }),
      headers: { "Content-Type": "application/json" },
    });
    const failedJob = await waitForJob(h, ((await again.json()) as JobBody).id, 60_000);
    expect(failedJob.status).toBe("failed");
    expect(failedJob.problem?.detail).toContain("weight dense_renamed/kernel is missing");
    const attempts = h.logs.filter(
      (l) => l.includes('"msg":"job attempt failed"') && l.includes(failedJob.id),
    );
    expect(attempts).toEqual([]);
  });

  /** Uploads two checkpoints without a TF.js topology and asks for their merge, evaluated on `dataset`. */
  const evaluatedMerge = async (dataset: string) => {
    const ids = [];
    for (const k of [1, 2])
      ids.push(((await (await upload(h, smallCheckpoint(k))).json()) as { id: string }).id);
    return h.request("/v1/merges", {
      method: "POST",
      body: JSON.stringify({ method: "papa-all", inputs: ids, evaluate: { dataset } }),
      headers: { "Content-Type": "application/json" },
    });
  };

  it("refuses to evaluate a merge of checkpoints it did not train", async () => {
    const res = await evaluatedMerge("mnist");
    expect(res.status).toBe(422);
    expect(((await res.json()) as { detail: string }).detail).toContain("no TF.js topology");
  });

  it.each([
    [{ dataset: "cifar-100" }, "dataset"],
    [{ population: { size: 2, variant: "papa", alpha: 0 } }, "alpha"],
    [{ population: { size: 2, variant: "papa", alpha: 1.5 } }, "alpha"],
    [{ population: { size: 2, variant: "papa", every_k_steps: 0 } }, "every_k_steps"],
    [{ population: { size: 2, variant: "papa-all", every_k_epochs: 0 } }, "every_k_epochs"],
    [{ population: { size: 33, variant: "papa" } }, "size"],
    [{ diversity: { mixup: [] } }, "mixup"],
    [{ epochs: 0 }, "epochs"],
    [{ optimizer: { lr: 0.01, min_lr: 0.1 } }, "min_lr"],
    [{ optimizer: { warmup_steps: -1 } }, "warmup_steps"],
    [{ optimizer: { warmup_steps: 2.5 } }, "warmup_steps"],
  ])("rejects %j with 422", async (change, field) => {
    const res = await postTraining(h, { ...quick, ...change });
    expect(res.status).toBe(422);
    expect(JSON.stringify(await expectDocumented("createTraining", res))).toContain(field);
  });

  it("refuses, at submit, a built-in dataset this service has not installed, and makes no job", async () => {
    // The harness's workers look for Fashion-MNIST in a directory that does not exist.
    const jobs = async () => (await h.ctx.db.select({ id: schema.jobs.id }).from(schema.jobs)).length;
    const before = await jobs();
    const res = await postTraining(h, { ...quick, dataset: "fashion-mnist" });
    expect(res.status).toBe(422);
    const problem = (await expectDocumented("createTraining", res)) as { detail: string };
    expect(problem.detail).toContain(
      "dataset fashion-mnist is not installed on this service (it offers mnist;",
    );
    const merge = await evaluatedMerge("fashion-mnist");
    expect(merge.status).toBe(422);
    expect(((await merge.json()) as { detail: string }).detail).toContain("fashion-mnist is not installed");
    expect(await jobs()).toBe(before);
  });

  it("fails a training clearly when PAPA_DATASETS offers a dataset its worker does not have", async () => {
    const offering = await startHarness("pglite", "filesystem", {
      worker: true,
      datasets: ["mnist", "fashion-mnist"],
    });
    try {
      const res = await postTraining(offering, { ...quick, dataset: "fashion-mnist" });
      expect(res.status).toBe(202);
      const job = await waitForJob(offering, ((await res.json()) as JobBody).id);
      expect(job.status).toBe("failed");
      expect(job.problem?.detail).toContain("/nonexistent/fashion-mnist/train-images-idx3-ubyte");
    } finally {
      await offering.close();
    }
  });

  it("cancels a running training after an epoch: no output registered, no saved state left", async () => {
    const before = await h.ctx.store.list(`tenants/${h.tenantA}/`);
    const res = await postTraining(h, { ...quick, max_train_examples: 1000, epochs: 20, batch_size: 16 });
    const { id } = (await res.json()) as JobBody;
    const state = `tenants/${h.tenantA}/jobs/${id}/`;
    while ((await h.ctx.store.list(state)).length === 0) await new Promise((r) => setTimeout(r, 50));
    expect((await h.request(`/v1/jobs/${id}/cancel`, { method: "POST" })).status).toBe(200);
    // The worker notices at its next progress report, stops, and deletes what it wrote.
    const until = Date.now() + 15_000;
    while (Date.now() < until && (await h.ctx.store.list(`tenants/${h.tenantA}/`)).length !== before.length) {
      await new Promise((r) => setTimeout(r, 100));
    }
    await new Promise((r) => setTimeout(r, 1000));
    const job = (await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody & { result: unknown };
    expect(job.status).toBe("canceled");
    expect(job.result).toBeNull();
    expect(await h.ctx.store.list(`tenants/${h.tenantA}/`)).toEqual(before);
  });

  it("serves no TF.js model for an uploaded checkpoint", async () => {
    const { id } = (await (await upload(h, smallCheckpoint(1))).json()) as { id: string };
    const res = await h.request(`/v1/checkpoints/${id}/tfjs/model.json`);
    expect(res.status).toBe(404);
    expect(((await res.json()) as { detail: string }).detail).toContain("no TF.js topology");
  });
});
