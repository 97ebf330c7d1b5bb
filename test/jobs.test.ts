import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startWorker } from "../src/jobs/worker.js";
import type { DatabaseKind, StoreKind } from "./helpers/backends.js";
import { expectDocumented } from "./helpers/contract.js";
import { type Harness, startHarness, TEST_WORKER, upload } from "./helpers/harness.js";
import { type JobBody, member, mergeAndWait, postMerge, waitForJob, weightsOf } from "./helpers/jobs.js";
import { registerLineage, registerPullChain } from "./helpers/lineage.js";
import { buildSafetensors } from "./helpers/safetensors.js";

interface Lineage {
  nodes: { id: string; depth: number; metrics: { name: string; value: number }[] }[];
  edges: { parent_id: string; child_id: string; coefficient: number; method: string; job_id: string }[];
  contributions: { checkpoint_id: string; weight: number; root: boolean }[];
}

describe.each<[DatabaseKind, StoreKind]>([
  ["pglite", "filesystem"],
  ["postgres", "s3"],
])("merge jobs on %s + %s", (db, store) => {
  let h: Harness;
  let inputs: string[];
  beforeAll(async () => {
    h = await startHarness(db, store, { worker: true });
    inputs = [];
    for (const k of [1, 2, 3])
      inputs.push(((await (await upload(h, member(k), `member-${k}`)).json()) as { id: string }).id);
  });
  afterAll(() => h.close());

  it("papa-all: one uniform average, integers from the first input, edges of 1/3, a documented job", async () => {
    const res = await postMerge(h, { method: "papa-all", inputs, name: "soup" });
    expect(res.status).toBe(202);
    const created = (await expectDocumented("createMerge", res)) as JobBody;
    expect(res.headers.get("location")).toBe(`/v1/jobs/${created.id}`);
    const job = await waitForJob(h, created.id);
    await expectDocumented("getJob", await h.request(`/v1/jobs/${created.id}`));
    expect(job.status).toBe("succeeded");
    expect(job.progress).toBe(1);
    const [out] = job.result?.checkpoints ?? [];
    expect(out?.name).toBe("soup");
    expect(await weightsOf(h, out?.id ?? "")).toEqual({ w: [2, 4, -2, 1], steps: 11n });
    const shown = (await (await h.request(`/v1/checkpoints/${out?.id}`)).json()) as {
      job_id: string;
      parents: { checkpoint_id: string; coefficient: number }[];
    };
    expect(shown.job_id).toBe(job.id);
    expect(shown.parents.map((p) => p.checkpoint_id).sort()).toEqual([...inputs].sort());
    for (const p of shown.parents) expect(p.coefficient).toBeCloseTo(1 / 3, 15);
  });

  it("papa-2, weighted and papa-pull: outputs and edge coefficients match the definitions", async () => {
    const pairs = await mergeAndWait(h, { method: "papa-2", inputs, seed: 5, name: "pairs" });
    expect(pairs.result?.checkpoints).toHaveLength(3);
    const drawn: string[] = [];
    for (const out of pairs.result?.checkpoints ?? []) {
      const lineage = (await (await h.request(`/v1/checkpoints/${out.id}/lineage`)).json()) as Lineage;
      expect(lineage.edges.map((e) => e.coefficient)).toEqual([0.5, 0.5]);
      const [a = 0, b = 0] = lineage.edges.map((e) => inputs.indexOf(e.parent_id) + 1).sort();
      drawn.push(`${a}-${b}`);
      const mean = (a + b) / 2;
      // The integer counter comes from the child's own first parent (10 + k), not from input 0.
      expect(await weightsOf(h, out.id)).toEqual({ w: [mean, 2 * mean, -mean, 1], steps: BigInt(10 + a) });
    }
    // Three inputs have three pairs: each child is a different one.
    expect(drawn.sort()).toEqual(["1-2", "1-3", "2-3"]);

    const weighted = await mergeAndWait(h, { method: "weighted", inputs, coefficients: [0.25, 0.25, 0.5] });
    // Integers from the heaviest input.
    expect(await weightsOf(h, weighted.result?.checkpoints[0]?.id ?? "")).toEqual({
      w: [2.25, 4.5, -2.25, 1],
      steps: 13n,
    });

    const pulled = await mergeAndWait(h, { method: "papa-pull", inputs, beta: 0.5 });
    const outs = pulled.result?.checkpoints ?? [];
    expect(outs).toHaveLength(3);
    for (const [j, out] of outs.entries()) {
      const k = j + 1;
      const x = 0.5 * k + 0.5 * 2; // (1 - beta) * input_k + beta * mean, mean = 2
      expect(await weightsOf(h, out.id)).toEqual({ w: [x, 2 * x, -x, 1], steps: BigInt(10 + k) });
      const { edges } = (await (await h.request(`/v1/checkpoints/${out.id}/lineage`)).json()) as Lineage;
      expect(edges.reduce((s, e) => s + e.coefficient, 0)).toBeCloseTo(1, 12);
      expect(edges.find((e) => e.parent_id === inputs[j])?.coefficient).toBeCloseTo(0.5 + 0.5 / 3, 12);
    }
  });

  it("lineage: ancestors with each root's contribution, descendants, metrics on nodes", async () => {
    const pulled = await mergeAndWait(h, { method: "papa-pull", inputs, beta: 0.25 });
    const ids = (pulled.result?.checkpoints ?? []).map((c) => c.id);
    const soup = await mergeAndWait(h, { method: "weighted", inputs: ids, coefficients: [0.5, 0.3, 0.2] });
    const soupId = soup.result?.checkpoints[0]?.id ?? "";
    const metric = await h.request(`/v1/checkpoints/${soupId}/metrics`, {
      method: "POST",
      body: JSON.stringify({ dataset: "mnist", split: "test", name: "accuracy", value: 0.93 }),
      headers: { "Content-Type": "application/json" },
    });
    expect(metric.status).toBe(201);
    await expectDocumented("createCheckpointMetric", metric);

    const res = await h.request(`/v1/checkpoints/${soupId}/lineage?direction=ancestors`);
    const lineage = (await expectDocumented("getCheckpointLineage", res)) as Lineage;
    expect(lineage.nodes.map((n) => n.depth)).toEqual([0, 1, 1, 1, 2, 2, 2]);
    expect(lineage.nodes[0]?.metrics).toMatchObject([{ name: "accuracy", value: 0.93 }]);
    expect(lineage.edges).toHaveLength(3 + 9);
    // weight of root r = sum_j c_soup[j] * pull[j][r], pull[j][r] = beta/3 + (j == r) * (1 - beta)
    const c = [0.5, 0.3, 0.2];
    const want = inputs.map((_, r) => c.reduce((s, cj, j) => s + cj * (0.25 / 3 + (j === r ? 0.75 : 0)), 0));
    const got = inputs.map(
      (id) => lineage.contributions.find((x) => x.checkpoint_id === id)?.weight ?? Number.NaN,
    );
    for (const [r, g] of got.entries()) expect(g).toBeCloseTo(want[r] ?? 0, 12);
    expect(got.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 12);

    for (const c of lineage.contributions) expect(c.root).toBe(true);

    // Cut at depth 1: the walk ends at the soup's parents, and the weights are relative to them.
    const shallow = (await (await h.request(`/v1/checkpoints/${soupId}/lineage?depth=1`)).json()) as Lineage;
    expect(shallow.nodes).toHaveLength(4);
    expect(ids.map((id) => shallow.contributions.find((x) => x.checkpoint_id === id))).toEqual(
      c.map((weight, j) => ({ checkpoint_id: ids[j], weight, root: false })),
    );
    const down = (await (
      await h.request(`/v1/checkpoints/${inputs[0]}/lineage?direction=descendants`)
    ).json()) as Lineage;
    expect(down.nodes.map((n) => n.id)).toContain(soupId);
    expect(down.contributions).toEqual([]);
  });

  it("averages F8_E4M3 for real and refuses an F4 tensor with a 422 naming it and its dtype", async () => {
    // E4M3 codes: 0x38 = 1.0, 0x40 = 2.0, 0x3c = 1.5.
    const f8 = (code: number, scales: string | null) =>
      buildSafetensors([
        { name: "q", dtype: "F8_E4M3", shape: [2], data: Buffer.from([code, 0x40]) },
        ...(scales ? [{ name: "scales", dtype: scales, shape: [2], data: Buffer.from([0x21]) }] : []),
      ]);
    const ids: string[] = [];
    for (const code of [0x38, 0x40])
      ids.push(((await (await upload(h, f8(code, null))).json()) as { id: string }).id);
    const soup = await mergeAndWait(h, { method: "papa-all", inputs: ids });
    const bytes = Buffer.from(
      await (await h.request(`/v1/checkpoints/${soup.result?.checkpoints[0]?.id}/weights`)).arrayBuffer(),
    );
    expect([...bytes.subarray(-2)]).toEqual([0x3c, 0x40]);

    const packed: string[] = [];
    for (const code of [0x38, 0x40])
      packed.push(((await (await upload(h, f8(code, "F4"))).json()) as { id: string }).id);
    const res = await postMerge(h, { method: "papa-all", inputs: packed });
    expect(res.status).toBe(422);
    const problem = (await expectDocumented("createMerge", res)) as { detail: string; tensor: string };
    expect(problem.tensor).toBe("scales");
    expect(problem.detail).toContain('"scales" is F4, which cannot be averaged');
  });

  it("lineage of 30 generations of PAPA pulls over 4 models: 4^30 paths, contributions in one pass", async () => {
    const chain = await registerPullChain(h.ctx, h.tenantA, 30, 4, 0.3);
    const last = chain.at(-1)?.[2] ?? "";
    const res = await h.request(`/v1/checkpoints/${last}/lineage?depth=100`);
    const lineage = (await expectDocumented("getCheckpointLineage", res)) as Lineage;
    expect(lineage.nodes).toHaveLength(31 * 4 - 3); // generation 30 holds only the one asked about
    // Pulls toward a common mean: each root's weight is 1/4 + (3/4 - ...) x 0.7^30 for its own line.
    const own = 0.25 + 0.75 * 0.7 ** 30;
    const other = 0.25 - 0.25 * 0.7 ** 30;
    const roots = chain[0] ?? [];
    for (const [k, id] of roots.entries()) {
      const got = lineage.contributions.find((x) => x.checkpoint_id === id);
      expect(got?.root).toBe(true);
      expect(got?.weight).toBeCloseTo(k === 2 ? own : other, 12);
    }
    // Cut at 10 generations: 4 frontier checkpoints whose weights still sum to 1.
    const cut = (await (await h.request(`/v1/checkpoints/${last}/lineage?depth=10`)).json()) as Lineage;
    expect(cut.contributions.map((x) => x.root)).toEqual([false, false, false, false]);
    expect(cut.contributions.reduce((a, x) => a + x.weight, 0)).toBeCloseTo(1, 12);
  });

  it("lineage cut at its depth stops at the frontier, even where a frontier node's parent was walked", async () => {
    // a (root) and d (root); b = 0.5 a + 0.5 d; c = 0.5 b + 0.5 a. At depth 1 the walk holds
    // c, b and a: b is on the frontier (its parent d is not walked) though a, its other parent, is.
    const [a, b, c, d] = await registerLineage(h.ctx, h.tenantA, 4, [
      [1, 0, 0.5],
      [1, 3, 0.5],
      [2, 1, 0.5],
      [2, 0, 0.5],
    ]);
    const at = async (depth: number) =>
      ((await (await h.request(`/v1/checkpoints/${c}/lineage?depth=${depth}`)).json()) as Lineage)
        .contributions;
    const shallow = await at(1);
    expect(shallow.reduce((s, x) => s + x.weight, 0)).toBeCloseTo(1, 12);
    expect(shallow.find((x) => x.checkpoint_id === a)).toEqual({ checkpoint_id: a, weight: 0.5, root: true });
    expect(shallow.find((x) => x.checkpoint_id === b)).toEqual({
      checkpoint_id: b,
      weight: 0.5,
      root: false,
    });
    const full = await at(10);
    expect(full.find((x) => x.checkpoint_id === a)?.weight).toBe(0.75);
    expect(full.find((x) => x.checkpoint_id === d)?.weight).toBe(0.25);
  });

  it("refuses inputs that do not agree, naming the tensor, creating no job and no blob", async () => {
    const odd = ((await (await upload(h, member(4, { name: "head", shape: [2] }))).json()) as { id: string })
      .id;
    const before = await h.leftovers();
    const jobsBefore = ((await (await h.request("/v1/jobs?limit=200")).json()) as { items: unknown[] }).items
      .length;
    const res = await postMerge(h, { method: "papa-all", inputs: [inputs[0], odd] });
    expect(res.status).toBe(422);
    const problem = (await expectDocumented("createMerge", res)) as { detail: string; tensor: string };
    expect(problem.tensor).toBe("head");
    expect(problem.detail).toContain('"head"');
    expect(await h.leftovers()).toEqual(before);
    expect(
      ((await (await h.request("/v1/jobs?limit=200")).json()) as { items: unknown[] }).items,
    ).toHaveLength(jobsBefore);
  });

  it.each([
    [{ method: "weighted", coefficients: [0.5, 0.6, 0.1] }, 422, "sum to 1"],
    [{ method: "papa-pull", beta: 0 }, 422, "beta"],
    [{ method: "blend" }, 422, "method"],
    [{ method: "papa-all", extra: 1 }, 422, "extra"],
  ])("rejects %j", async (body, status, text) => {
    const res = await postMerge(h, { inputs, ...body });
    expect(res.status).toBe(status);
    expect(JSON.stringify(await res.json())).toContain(text);
  });

  it("refuses another tenant's or a deleted input", async () => {
    const other = await postMerge(h, { method: "papa-all", inputs }, {});
    expect(other.status).toBe(202);
    const res = await h.request("/v1/merges", {
      method: "POST",
      key: h.keyB,
      body: JSON.stringify({ method: "papa-all", inputs }),
      headers: { "Content-Type": "application/json" },
    });
    expect(res.status).toBe(422);
    expect(((await res.json()) as { detail: string }).detail).toContain("not found");
  });

  it("replays an Idempotency-Key and refuses its reuse for another request", async () => {
    const body = { method: "papa-all", inputs, name: "once" };
    const first = await postMerge(h, body, { "Idempotency-Key": "merge-once" });
    const second = await postMerge(h, body, { "Idempotency-Key": "merge-once" });
    expect(first.status).toBe(202);
    expect(second.status).toBe(200);
    const [a, b] = [(await first.json()) as JobBody, (await second.json()) as JobBody];
    expect(b.id).toBe(a.id);
    const other = await postMerge(h, { ...body, name: "twice" }, { "Idempotency-Key": "merge-once" });
    expect(other.status).toBe(409);
    await waitForJob(h, a.id);
  });

  it("streams progress and the final state as server-sent events", async () => {
    const res = await postMerge(h, { method: "papa-all", inputs });
    const { id, events_url } = (await res.json()) as JobBody;
    const events = await h.request(events_url);
    expect(events.status).toBe(200);
    expect(events.headers.get("content-type")).toContain("text/event-stream");
    const text = await events.text();
    const states = [...text.matchAll(/^data: (.*)$/gm)].map((m) => JSON.parse(m[1] ?? "{}") as JobBody);
    expect(states.at(-1)?.status).toBe("succeeded");
    expect(states.at(-1)?.id).toBe(id);
    expect(text).toContain("event: job");
  });

  it("lists jobs by status and kind", async () => {
    const res = await h.request("/v1/jobs?status=succeeded&kind=merge&limit=2");
    const page = (await expectDocumented("listJobs", res)) as {
      items: JobBody[];
      next_cursor: string | null;
    };
    expect(page.items).toHaveLength(2);
    expect(page.items.every((j) => j.status === "succeeded")).toBe(true);
    expect(page.next_cursor).not.toBeNull();
    const none = (await (await h.request("/v1/jobs?status=running&status=queued&kind=train")).json()) as {
      items: unknown[];
    };
    expect(none.items).toEqual([]);
  });
});

describe("jobs before a worker picks them up", () => {
  let h: Harness;
  let inputs: string[];
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem");
    inputs = [];
    for (const k of [1, 2]) inputs.push(((await (await upload(h, member(k))).json()) as { id: string }).id);
  });
  afterAll(() => h.close());

  it("a canceled job produces nothing; an input deleted before the job runs fails it clearly", async () => {
    const canceled = (await (await postMerge(h, { method: "papa-all", inputs })).json()) as JobBody;
    const cancel = await h.request(`/v1/jobs/${canceled.id}/cancel`, { method: "POST" });
    expect(cancel.status).toBe(200);
    expect(((await expectDocumented("cancelJob", cancel)) as JobBody).status).toBe("canceled");
    expect((await h.request(`/v1/jobs/${canceled.id}/cancel`, { method: "POST" })).status).toBe(200);

    const orphaned = (await (await postMerge(h, { method: "papa-all", inputs })).json()) as JobBody;
    expect((await h.request(`/v1/checkpoints/${inputs[1]}`, { method: "DELETE" })).status).toBe(204);
    const before = await h.leftovers();

    await startWorker(h.ctx, TEST_WORKER);
    const failed = await waitForJob(h, orphaned.id);
    expect(failed.status).toBe("failed");
    expect(failed.problem?.detail).toContain(`input checkpoint ${inputs[1]} was deleted`);
    expect((await waitForJob(h, canceled.id)).status).toBe("canceled");
    expect(await h.leftovers()).toEqual(before);
    const conflict = await h.request(`/v1/jobs/${failed.id}/cancel`, { method: "POST" });
    expect(conflict.status).toBe(409);
  });
});
