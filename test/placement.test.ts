import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DatabaseKind, StoreKind } from "./helpers/backends.js";
import { expectDocumented } from "./helpers/contract.js";
import { type Harness, startHarness } from "./helpers/harness.js";
import { type JobBody, waitForJob } from "./helpers/jobs.js";

// Trainings placed on several workers (`placement: {workers: N}`): shards of the population in
// jobs of their own, averaging through a population. The harness's worker runs two trainings at
// once (TEST_WORKER.trainConcurrency), each in a process of its own.

interface PlacedResult {
  members: { checkpoint_id: string; accuracy: number }[];
  ensemble_accuracy: number;
  uniform_soup: { checkpoint_id: string; accuracy: number };
  checkpoints: { id: string }[];
  placement: { population_id: string; shards: { job_id: string; members: number[] }[] };
}

interface PopulationBody {
  size: number;
  quorum: number;
  current_round: number;
  rounds: { round: number; status: string; submitted: number[]; outputs: { checkpoint_id: string }[] }[];
}

const json = { "Content-Type": "application/json" };

/** Small enough that a member (an MLP 784-12-10) fits the harness's 64 KB upload limit. */
function training(variant: string, extra: object = {}) {
  return {
    dataset: "mnist",
    max_train_examples: 256,
    max_test_examples: 100,
    model: { kind: "mlp", hidden: [12] },
    population: { size: 3, variant, every_k_steps: 3, every_k_epochs: 1, seed: 7 },
    diversity: { label_smoothing: [0, 0.1] },
    optimizer: { lr: 0.1 },
    epochs: 2,
    batch_size: 32,
    ...extra,
  };
}

/** Every tensor of a safetensors file, as float32. */
function tensorsOf(bytes: Buffer): Map<string, Float32Array> {
  const length = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + length).toString()) as Record<
    string,
    { data_offsets: [number, number] }
  >;
  const data = bytes.subarray(8 + length);
  const tensors = new Map<string, Float32Array>();
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const slice = Buffer.from(data.subarray(t.data_offsets[0], t.data_offsets[1]));
    tensors.set(name, new Float32Array(slice.buffer, slice.byteOffset, slice.byteLength / 4));
  }
  return tensors;
}

describe.each<[DatabaseKind, StoreKind]>([
  ["pglite", "filesystem"],
  ["postgres", "s3"],
])("trainings placed on several workers, on %s + %s", (db, store) => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness(db, store, { worker: true });
  });
  afterAll(() => h.close());

  async function train(body: object): Promise<JobBody> {
    const res = await h.request("/v1/trainings", {
      method: "POST",
      body: JSON.stringify(body),
      headers: json,
    });
    expect(res.status, await res.clone().text()).toBe(202);
    return (await res.json()) as JobBody;
  }

  async function weightsOf(checkpointId: string): Promise<Map<string, Float32Array>> {
    const res = await h.request(`/v1/checkpoints/${checkpointId}/weights`);
    expect(res.status).toBe(200);
    return tensorsOf(Buffer.from(await res.arrayBuffer()));
  }

  /** The largest difference between two members' weights, over every tensor. */
  async function largestDifference(a: string, b: string): Promise<number> {
    const [x, y] = [await weightsOf(a), await weightsOf(b)];
    expect([...x.keys()]).toEqual([...y.keys()]);
    let largest = 0;
    for (const [name, values] of x) {
      const other = y.get(name) as Float32Array;
      for (let i = 0; i < values.length; i++) {
        largest = Math.max(largest, Math.abs((values[i] as number) - (other[i] as number)));
      }
    }
    return largest;
  }

  it.each(["papa-all", "papa"])(
    "a %s training on 2 workers trains the members that one job trains, its rounds in a population",
    async (variant) => {
      const alone = await waitForJob(h, (await train(training(variant))).id, 120_000);
      expect(alone.status, JSON.stringify(alone.problem)).toBe("succeeded");
      const lead = await waitForJob(
        h,
        (await train(training(variant, { placement: { workers: 2 } }))).id,
        120_000,
      );
      expect(lead.status, JSON.stringify(lead.problem)).toBe("succeeded");

      const result = (
        (await expectDocumented("getJob", await h.request(`/v1/jobs/${lead.id}`))) as { result: PlacedResult }
      ).result;
      expect(result.members).toHaveLength(3);
      expect(result.checkpoints).toHaveLength(5);
      expect(result.placement.shards.map((s) => s.members)).toEqual([[0], [1, 2]]);
      expect(result.placement.shards[0]?.job_id).toBe(lead.id);

      // The other shard's job stored nothing and names its lead.
      const helper = (await expectDocumented(
        "getJob",
        await h.request(`/v1/jobs/${result.placement.shards[1]?.job_id}`),
      )) as JobBody & {
        result: {
          checkpoints: unknown[];
          placement: {
            lead_job_id: string;
            members: number[];
            evaluation: {
              members: { member: number; accuracy: number }[];
              uniform_soup: { accuracy: number };
            };
          };
        };
      };
      expect(helper.status).toBe("succeeded");
      expect(helper.result.checkpoints).toEqual([]);
      expect(helper.result).toMatchObject({ kind: "training-shard" });
      expect(helper.result.placement).toMatchObject({ lead_job_id: lead.id, members: [1, 2] });
      // It evaluated its members; the lead took their accuracies and test probabilities.
      const evaluated = helper.result.placement.evaluation.members;
      expect(evaluated.map((m) => m.member)).toEqual([1, 2]);
      for (const m of evaluated) expect(result.members[m.member]?.accuracy).toBe(m.accuracy);
      // The last shard made and evaluated the uniform soup (while the lead made the greedy one):
      // the lead stored those weights and reported that accuracy.
      const aloneResult = alone.result as unknown as PlacedResult;
      expect(result.uniform_soup.accuracy).toBe(helper.result.placement.evaluation.uniform_soup.accuracy);
      expect(
        await largestDifference(result.uniform_soup.checkpoint_id, aloneResult.uniform_soup.checkpoint_id),
      ).toBeLessThan(1e-3);
      expect(Math.abs(result.ensemble_accuracy - aloneResult.ensemble_accuracy)).toBeLessThanOrEqual(0.02);

      // Each member as one job trains it: the same seeds, the same averages (computed by the
      // merge engine instead of tf ops, so equal up to float rounding).
      const aloneMembers = (alone.result as unknown as PlacedResult).members;
      for (const [j, member] of result.members.entries()) {
        const difference = await largestDifference(
          member.checkpoint_id,
          aloneMembers[j]?.checkpoint_id ?? "",
        );
        expect(difference, `member ${j}`).toBeLessThan(1e-3);
      }
      // Not all the same: papa-all's last average is not after the last epoch, papa pulls by 1%.
      expect(
        await largestDifference(
          result.members[0]?.checkpoint_id ?? "",
          result.members[1]?.checkpoint_id ?? "",
        ),
      ).toBeGreaterThan(1e-3);

      // The population: every sync round and the final gather closed with all 3 members.
      // 256 examples less 2% held out: 8 steps an epoch, 16 in all; papa every 3 steps: 5 rounds.
      const syncs = variant === "papa" ? 5 : 1;
      const population = (await (
        await h.request(`/v1/populations/${result.placement.population_id}`)
      ).json()) as PopulationBody;
      expect(population).toMatchObject({ size: 3, quorum: 1, current_round: syncs + 1 });
      const closed = population.rounds.filter((r) => r.status === "closed");
      expect(closed.map((r) => r.round)).toEqual(Array.from({ length: syncs + 1 }, (_, r) => r));
      for (const r of closed) expect(r.submitted).toEqual([0, 1, 2]);
      // Only the last round's checkpoints are kept: the lead deleted each earlier round's.
      for (const r of closed) {
        const expected = r.round === syncs ? 200 : 410;
        for (const o of r.outputs) {
          expect((await h.request(`/v1/checkpoints/${o.checkpoint_id}/weights`)).status).toBe(expected);
        }
      }
    },
  );

  it("refuses more workers than members, or than the tenant's running jobs allow", async () => {
    for (const [placement, size, phrase] of [
      [{ workers: 4 }, 3, "exceeds the population"],
      [{ workers: 8 }, 8, "needs 9 jobs running at once"],
    ] as const) {
      const body = training("papa-all", { placement });
      body.population.size = size;
      const res = await h.request("/v1/trainings", {
        method: "POST",
        body: JSON.stringify(body),
        headers: json,
      });
      expect(res.status).toBe(422);
      expect(((await res.json()) as { detail: string }).detail).toContain(phrase);
    }
  });

  /** Waits until the population named `name` is past round `round`. */
  async function populationPast(name: string, round: number): Promise<void> {
    for (const until = Date.now() + 60_000; Date.now() < until; ) {
      const res = await h.request("/v1/populations?limit=50");
      const items = ((await res.json()) as { items: { name: string; current_round: number }[] }).items;
      if ((items.find((p) => p.name === name)?.current_round ?? -1) > round) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`population ${name} did not pass round ${round}`);
  }

  it("a shard's training process that dies resumes from the population's latest closed round", async () => {
    // papa-all every epoch over 5 epochs: kill the second shard's process once round 0 closed.
    const body = training("papa-all", { placement: { workers: 2, round_timeout_seconds: 60 }, epochs: 5 });
    const created = await train({ ...body, name: "resumed" });
    await populationPast("resumed", 0);
    const helperId = await shardJobOf(created.id);
    const started = h.logs
      .map((l) => JSON.parse(l) as { msg: string; job_id?: string; pid?: number })
      .filter((l) => l.msg === "training process started" && l.job_id === helperId);
    expect(started).toHaveLength(1);
    process.kill(started[0]?.pid as number, "SIGKILL");
    const lead = await waitForJob(h, created.id, 180_000);
    expect(lead.status, JSON.stringify(lead.problem)).toBe("succeeded");
    expect((await waitForJob(h, helperId)).status).toBe("succeeded");
    const resumed = h.logs.filter((l) => l.includes('"msg":"shard resumes from its population"'));
    expect(resumed.some((l) => l.includes(helperId))).toBe(true);
  });

  it("canceling a shard fails the training at its next round; canceling the lead cancels its shards", async () => {
    const slow = training("papa", { placement: { workers: 2 }, epochs: 20 });
    const first = await train({ ...slow, name: "canceled-shard" });
    await populationPast("canceled-shard", 0);
    const helperId = await shardJobOf(first.id);
    expect((await h.request(`/v1/jobs/${helperId}/cancel`, { method: "POST" })).status).toBe(200);
    const failed = await waitForJob(h, first.id, 60_000);
    expect(failed.status).toBe("failed");
    expect(failed.problem?.detail).toContain(`shard 1 of this training (job ${helperId}) canceled`);

    const second = await train({ ...slow, name: "canceled-lead" });
    await populationPast("canceled-lead", 0);
    const secondHelper = await shardJobOf(second.id);
    expect((await h.request(`/v1/jobs/${second.id}/cancel`, { method: "POST" })).status).toBe(200);
    expect((await waitForJob(h, secondHelper, 30_000)).status).toBe("canceled");
  });

  /** The id of the lead's other shard's job, from the job list. */
  async function shardJobOf(leadId: string): Promise<string> {
    const jobs = ((await (await h.request("/v1/jobs?kind=train&limit=200")).json()) as { items: JobBody[] })
      .items;
    const helper = jobs.find(
      (j) => (j.params.shard as { lead_job_id?: string } | undefined)?.lead_job_id === leadId,
    );
    if (!helper) throw new Error(`no shard job of ${leadId}`);
    return helper.id;
  }
});
