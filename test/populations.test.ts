import { count, sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { schema } from "../src/db/client.js";
import type { DatabaseKind, StoreKind } from "./helpers/backends.js";
import { countSelects, type Harness, startHarness, upload } from "./helpers/harness.js";
import { type JobBody, member, waitForJob, weightsOf } from "./helpers/jobs.js";
import { buildSafetensors, f32, rawSafetensors } from "./helpers/safetensors.js";

interface RoundBody {
  round: number;
  status: string;
  submitted: number[];
  job_id: string | null;
  outputs: { member: number; checkpoint_id: string }[];
}

interface PopulationBody {
  id: string;
  status: string;
  current_round: number;
  quorum: number;
  rounds: RoundBody[];
  finish_job_id: string | null;
  soup_checkpoint_id: string | null;
}

interface CheckpointBody {
  id: string;
  population: { id: string; round: number; member: number | null } | null;
  parents: { checkpoint_id: string; coefficient: number; method: string }[];
}

const json = { "Content-Type": "application/json" };
const octets = { "Content-Type": "application/octet-stream" };

describe.each<[DatabaseKind, StoreKind]>([
  ["pglite", "filesystem"],
  ["postgres", "s3"],
])("populations on %s + %s", (db, store) => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness(db, store, { worker: true });
  });
  afterAll(() => h.close());

  async function create(body: object, key?: string): Promise<PopulationBody> {
    const res = await h.request("/v1/populations", {
      method: "POST",
      body: JSON.stringify({ name: "pop", ...body }),
      headers: json,
      ...(key ? { key } : {}),
    });
    expect(res.status, await res.clone().text()).toBe(201);
    return (await res.json()) as PopulationBody;
  }

  function submit(id: string, round: number, m: number, body: Buffer | object, key?: string) {
    const raw = Buffer.isBuffer(body);
    return h.request(`/v1/populations/${id}/rounds/${round}/members/${m}`, {
      method: "PUT",
      body: raw ? body : JSON.stringify(body),
      headers: raw ? octets : json,
      ...(key ? { key } : {}),
    });
  }

  async function round(id: string, r: number, wait = 0): Promise<RoundBody> {
    const res = await h.request(`/v1/populations/${id}/rounds/${r}?wait=${wait}`);
    expect(res.status).toBe(200);
    return (await res.json()) as RoundBody;
  }

  async function checkpoint(id: string): Promise<CheckpointBody> {
    return (await (await h.request(`/v1/checkpoints/${id}`)).json()) as CheckpointBody;
  }

  async function outputW(r: RoundBody, m: number): Promise<number[]> {
    const output = r.outputs.find((o) => o.member === m);
    if (!output) throw new Error(`no output for member ${m}`);
    return (await weightsOf(h, output.checkpoint_id)).w;
  }

  async function counts() {
    const [rows] = await h.ctx.db.select({ n: count() }).from(schema.checkpoints);
    const [jobs] = await h.ctx.db.select({ n: count() }).from(schema.jobs);
    const { objects } = await h.leftovers();
    return { checkpoints: rows?.n, jobs: jobs?.n, objects: objects.length };
  }

  it("papa-all: a round closes when every member submitted, and gives each member the mean", async () => {
    const p = await create({ size: 3, method: "papa-all" });
    expect(p).toMatchObject({ status: "open", current_round: 0, quorum: 3 });
    expect((await submit(p.id, 0, 0, member(1))).status).toBe(201);
    expect((await submit(p.id, 0, 1, member(2))).status).toBe(201);
    const waiting = await round(p.id, 0);
    expect(waiting).toMatchObject({ status: "open", submitted: [0, 1], job_id: null, outputs: [] });
    const early = await h.request(`/v1/populations/${p.id}/rounds/0/members/0/weights`);
    expect(early.status).toBe(409);
    expect(early.headers.get("retry-after")).toBe("1");

    expect((await submit(p.id, 0, 2, member(3))).status).toBe(201);
    const closed = await round(p.id, 0, 20);
    expect(closed.status).toBe("closed");
    expect(closed.outputs.map((o) => o.member)).toEqual([0, 1, 2]);
    for (const m of [0, 1, 2]) expect(await outputW(closed, m)).toEqual([2, 4, -2, 1]);
    // Integers come from the heaviest input: the first, on a tie.
    expect((await weightsOf(h, closed.outputs[2]?.checkpoint_id ?? "")).steps).toBe(11n);

    const out = await checkpoint(closed.outputs[1]?.checkpoint_id ?? "");
    expect(out.population).toEqual({ id: p.id, round: 0, member: 1 });
    expect(out.parents.map((e) => [e.coefficient, e.method])).toEqual([
      [1 / 3, "papa-all"],
      [1 / 3, "papa-all"],
      [1 / 3, "papa-all"],
    ]);
    const next = (await (await h.request(`/v1/populations/${p.id}`)).json()) as PopulationBody;
    expect(next.current_round).toBe(1);
    expect(next.rounds.map((r) => [r.round, r.status])).toEqual([
      [0, "closed"],
      [1, "open"],
    ]);
    const redirect = await h.request(`/v1/populations/${p.id}/rounds/0/members/1/weights`);
    expect(redirect.status).toBe(302);
    expect(redirect.headers.get("location")).toBe(`/v1/checkpoints/${out.id}/weights`);
  });

  it("stores a papa-all round's outputs once, and keeps the bytes while one of them is not deleted", async () => {
    const p = await create({ size: 3, method: "papa-all" });
    for (const m of [0, 1, 2]) await submit(p.id, 0, m, member(m + 1));
    const before = (await h.leftovers()).objects.length;
    const closed = await round(p.id, 0, 20);
    const outputs = closed.outputs.map((o) => o.checkpoint_id);
    expect(new Set(outputs).size).toBe(3);
    expect((await h.leftovers()).objects.length).toBe(before + 1);
    // Deleted at once, two of the three: the third still has its bytes.
    const deleted = await Promise.all(
      outputs.slice(0, 2).map((id) => h.request(`/v1/checkpoints/${id}`, { method: "DELETE" })),
    );
    expect(deleted.map((r) => r.status)).toEqual([204, 204]);
    expect((await weightsOf(h, outputs[2] as string)).w).toEqual([2, 4, -2, 1]);
    expect((await h.request(`/v1/checkpoints/${outputs[0]}/weights`)).status).toBe(410);
    expect((await h.request(`/v1/checkpoints/${outputs[2]}`, { method: "DELETE" })).status).toBe(204);
    expect((await h.leftovers()).objects.length).toBe(before);
  });

  it("takes the same bytes again (200, nothing stored) and refuses others, closed rounds and rounds not open (409)", async () => {
    const p = await create({ size: 2, method: "papa-all" });
    const first = await submit(p.id, 0, 0, member(1));
    expect(first.status).toBe(201);
    const { checkpoint_id } = (await first.json()) as { checkpoint_id: string };
    const before = await counts();
    const again = await submit(p.id, 0, 0, member(1));
    expect(again.status).toBe(200);
    expect(((await again.json()) as { checkpoint_id: string }).checkpoint_id).toBe(checkpoint_id);
    expect((await submit(p.id, 0, 0, { checkpoint_id })).status).toBe(200);
    const other = await submit(p.id, 0, 0, member(5));
    expect(other.status).toBe(409);
    expect(((await other.json()) as { detail: string }).detail).toContain("already submitted other weights");
    const ahead = await submit(p.id, 1, 1, member(2));
    expect(ahead.status).toBe(409);
    expect(((await ahead.json()) as { detail: string }).detail).toContain("not open yet");
    expect(await counts()).toEqual(before);

    expect((await submit(p.id, 0, 1, member(3))).status).toBe(201);
    expect((await round(p.id, 0, 20)).status).toBe("closed");
    // A retry after the round closed is still the same submission; a late member is refused.
    expect((await submit(p.id, 0, 1, member(3))).status).toBe(200);
    const settled = await counts();
    const late = await submit(p.id, 0, 1, member(4));
    expect(late.status).toBe(409);
    expect(await counts()).toEqual(settled);
  });

  it("papa with a quorum: the round waits for its timeout, then pulls submitters and gives the others the mean", async () => {
    const p = await create({ size: 3, method: "papa", alpha: 0.75, quorum: 2, round_timeout_seconds: 2 });
    expect((await submit(p.id, 0, 0, member(1))).status).toBe(201);
    expect((await submit(p.id, 0, 2, member(5))).status).toBe(201);
    expect((await round(p.id, 0)).status).toBe("open"); // quorum, but neither all nor timed out
    const closed = await round(p.id, 0, 30);
    expect(closed).toMatchObject({ status: "closed", submitted: [0, 2] });
    const mean = [3, 6, -3, 1];
    const pulled = (k: number) => [k, 2 * k, -k, 1].map((v, i) => 0.75 * v + 0.25 * (mean[i] as number));
    expect(await outputW(closed, 0)).toEqual(pulled(1));
    expect(await outputW(closed, 1)).toEqual(mean);
    expect(await outputW(closed, 2)).toEqual(pulled(5));
    const edges = (await checkpoint(closed.outputs[2]?.checkpoint_id ?? "")).parents;
    expect(edges.map((e) => [e.coefficient, e.method]).sort()).toEqual([
      [0.125, "papa-pull"],
      [0.875, "papa-pull"],
    ]);
    // The member that did not submit may submit to the next round.
    expect((await submit(p.id, 1, 1, member(2))).status).toBe(201);
  });

  it("a worker closes a round whose timeout passed, without anyone asking", async () => {
    const p = await create({ size: 4, method: "papa-all", quorum: 1, round_timeout_seconds: 1 });
    expect((await submit(p.id, 0, 3, member(2))).status).toBe(201);
    const until = Date.now() + 20_000;
    let population: PopulationBody;
    do {
      await new Promise((r) => setTimeout(r, 200));
      population = (await (await h.request(`/v1/populations/${p.id}`)).json()) as PopulationBody;
    } while (population.current_round === 0 && Date.now() < until);
    expect(population.rounds[0]).toMatchObject({ status: "closed", submitted: [3] });
    for (const m of [0, 1, 2, 3])
      expect(await outputW(population.rounds[0] as RoundBody, m)).toEqual([2, 4, -2, 1]);
  });

  it("papa-2: each member gets the average of a distinct pair of submissions", async () => {
    const p = await create({ size: 4, method: "papa-2", seed: 7 });
    const ids: string[] = [];
    for (const m of [0, 1, 2, 3]) {
      const res = await submit(p.id, 0, m, member(2 ** m));
      ids.push(((await res.json()) as { checkpoint_id: string }).checkpoint_id);
    }
    const closed = await round(p.id, 0, 20);
    expect(closed.status).toBe("closed");
    const pairs = new Set<string>();
    for (const output of closed.outputs) {
      const { w } = await weightsOf(h, output.checkpoint_id);
      const parents = (await checkpoint(output.checkpoint_id)).parents;
      expect(parents.map((e) => e.coefficient)).toEqual([0.5, 0.5]);
      const sum = parents.reduce((s, e) => s + 2 ** ids.indexOf(e.checkpoint_id), 0);
      expect(w[0]).toBe(sum / 2);
      pairs.add(parents.map((e) => e.checkpoint_id).join());
    }
    expect(pairs.size).toBe(4);
  });

  it("submissions that race close the round once: one job, one output per member", async () => {
    const p = await create({ size: 4, method: "papa-all" });
    const answers = await Promise.all([0, 1, 2, 3].map((m) => submit(p.id, 0, m, member(m))));
    expect(answers.map((r) => r.status)).toEqual([201, 201, 201, 201]);
    const closed = await round(p.id, 0, 20);
    expect(closed.status).toBe("closed");
    expect(closed.outputs.map((o) => o.member)).toEqual([0, 1, 2, 3]);
    const jobs = await h.ctx.db
      .select({ id: schema.jobs.id })
      .from(schema.jobs)
      .where(sql`${schema.jobs.params}->'population'->>'id' = ${p.id}`);
    expect(jobs.map((j) => j.id)).toEqual([closed.job_id]);
    const population = (await (await h.request(`/v1/populations/${p.id}`)).json()) as PopulationBody;
    expect(population.rounds.map((r) => r.round)).toEqual([0, 1]);
  });

  it("refuses tensors that disagree with the population's, naming the first, and keeps nothing", async () => {
    const initial = ((await (await upload(h, member(0), "init")).json()) as { id: string }).id;
    const p = await create({ size: 2, method: "papa-all", initial_checkpoint_id: initial });
    const before = await counts();
    const res = await submit(p.id, 0, 0, member(1, { name: "extra", shape: [2] }));
    expect(res.status).toBe(422);
    expect(((await res.json()) as { detail: string }).detail).toContain("extra");
    const shaped = buildSafetensors([{ name: "w", dtype: "F32", shape: [2, 2], data: f32([1, 2, 3, 4]) }]);
    const wrong = await submit(p.id, 0, 1, shaped);
    expect(wrong.status).toBe(422);
    expect(await counts()).toEqual(before);
    expect((await submit(p.id, 0, 0, member(1))).status).toBe(201);
  });

  it("finishes with the uniform soup of the last round's submissions, then takes nothing more", async () => {
    const p = await create({ size: 2, method: "papa", alpha: 0.9 });
    expect((await h.request(`/v1/populations/${p.id}/finish`, { method: "POST" })).status).toBe(409);
    await submit(p.id, 0, 0, member(1));
    await submit(p.id, 0, 1, member(3));
    expect((await round(p.id, 0, 20)).status).toBe("closed");
    const res = await h.request(`/v1/populations/${p.id}/finish`, { method: "POST" });
    expect(res.status).toBe(202);
    const job = await waitForJob(h, ((await res.json()) as JobBody).id);
    expect(job.status).toBe("succeeded");
    const soup = (job.result as unknown as { soup_checkpoint_id: string }).soup_checkpoint_id;
    expect((await weightsOf(h, soup)).w).toEqual([2, 4, -2, 1]);
    expect((await checkpoint(soup)).population).toEqual({ id: p.id, round: 0, member: null });
    const done = (await (await h.request(`/v1/populations/${p.id}`)).json()) as PopulationBody;
    expect(done).toMatchObject({ status: "finished", soup_checkpoint_id: soup, finish_job_id: job.id });
    const again = await h.request(`/v1/populations/${p.id}/finish`, { method: "POST" });
    expect(again.status).toBe(200);
    expect(((await again.json()) as JobBody).id).toBe(job.id);
    const before = await counts();
    const late = await submit(p.id, 1, 0, member(1));
    expect(late.status).toBe(409);
    expect(((await late.json()) as { detail: string }).detail).toContain("finished");
    expect(await counts()).toEqual(before);
  });

  it("streams the population's state as server-sent events until it is finished", async () => {
    const p = await create({ size: 2, method: "papa-all" });
    const res = await h.request(`/v1/populations/${p.id}/events`);
    expect(res.headers.get("content-type")).toContain("text/event-stream");
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    const events: PopulationBody[] = [];
    const reading = (async () => {
      let text = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        text += Buffer.from(value).toString();
        for (const block of text.split("\n\n").slice(0, -1)) {
          const data = block.split("\n").find((l) => l.startsWith("data: "));
          if (data) events.push(JSON.parse(data.slice(6)) as PopulationBody);
        }
        text = text.slice(text.lastIndexOf("\n\n") + 2);
      }
    })();
    const seen = () => events.map((e) => `${e.status}:${e.current_round}:${e.rounds[0]?.submitted.join("")}`);
    const told = async (state: string) => {
      const until = Date.now() + 10_000;
      while (!seen().includes(state) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
      expect(seen()).toContain(state);
    };
    await told("open:0:");
    await submit(p.id, 0, 0, member(1));
    await told("open:0:0");
    await submit(p.id, 0, 1, member(3));
    await told("open:1:");
    await h.request(`/v1/populations/${p.id}/finish`, { method: "POST" });
    await reading;
    expect(seen().at(-1)).toBe("finished:1:");
    // An event only for a change.
    for (let i = 1; i < events.length; i++) expect(events[i]).not.toEqual(events[i - 1]);
  });

  it("lists populations newest first, a page at a time", async () => {
    const a = await create({ size: 2, method: "papa-all", name: "listed-a" });
    const b = await create({ size: 2, method: "papa-all", name: "listed-b" });
    const page = (await (await h.request("/v1/populations?limit=1")).json()) as {
      items: PopulationBody[];
      next_cursor: string;
    };
    expect(page.items.map((i) => i.id)).toEqual([b.id]);
    const next = (await (await h.request(`/v1/populations?limit=1&cursor=${page.next_cursor}`)).json()) as {
      items: PopulationBody[];
    };
    expect(next.items.map((i) => i.id)).toEqual([a.id]);
  });

  it("lists a page of populations, each with its current round, in queries that do not grow with the page", async () => {
    const queries = async (limit: number) => {
      // The listing's own queries: not a round check running meanwhile. The key is looked up
      // by each (its trust lapses after a second, which could fall between the two).
      const selects = countSelects(h, { onlyWithin: true });
      h.ctx.knownKeys.clear();
      try {
        const res = await selects.within(() => h.request(`/v1/populations?limit=${limit}`));
        expect(res.status).toBe(200);
        return { selects: selects.count(), items: ((await res.json()) as { items: PopulationBody[] }).items };
      } finally {
        selects.stop();
      }
    };
    const made = [];
    for (let i = 0; i < 4; i++) made.push(await create({ size: 2, method: "papa-all", name: `paged-${i}` }));
    const [, second, third] = made;
    expect((await submit(second?.id ?? "", 0, 1, member(1))).status).toBe(201);
    expect((await submit(third?.id ?? "", 0, 0, member(1))).status).toBe(201);
    expect((await submit(third?.id ?? "", 0, 1, member(3))).status).toBe(201);
    expect((await round(third?.id ?? "", 0, 20)).status).toBe("closed");

    const two = await queries(2);
    const four = await queries(4);
    expect(two.selects).toBeGreaterThan(1); // the key's lookup, and the listing's own
    expect(four.selects).toBe(two.selects);
    const byId = new Map(four.items.map((p) => [p.id, p]));
    expect(byId.get(made[0]?.id ?? "")?.rounds).toMatchObject([{ round: 0, status: "open", submitted: [] }]);
    expect(byId.get(second?.id ?? "")?.rounds).toMatchObject([{ round: 0, status: "open", submitted: [1] }]);
    expect(byId.get(third?.id ?? "")).toMatchObject({
      current_round: 1,
      rounds: [{ round: 1, status: "open", submitted: [], outputs: [] }],
    });
  });

  it("answers bad input with a problem and keeps nothing", async () => {
    const p = await create({ size: 2, method: "papa-all" });
    const before = await counts();
    const post = (body: object) =>
      h.request("/v1/populations", {
        method: "POST",
        body: JSON.stringify({ name: "x", ...body }),
        headers: json,
      });
    expect((await post({ size: 1, method: "papa-all" })).status).toBe(422);
    expect((await post({ size: 65, method: "papa-all" })).status).toBe(422);
    expect((await post({ size: 2, method: "papa-3" })).status).toBe(422);
    expect((await post({ size: 2, method: "papa-all", quorum: 3 })).status).toBe(422);
    const foreign = ((await (await upload(h, member(1), "b-s", { key: h.keyB })).json()) as { id: string })
      .id;
    const afterForeign = await counts();
    expect((await post({ size: 2, method: "papa-all", initial_checkpoint_id: foreign })).status).toBe(404);
    expect((await submit(p.id, 0, 0, { checkpoint_id: foreign })).status).toBe(404);
    expect((await submit(p.id, 0, 2, member(1))).status).toBe(422);
    const unknown = "0193c1d2-7a1b-7c3d-8e4f-5a6b7c8d9e0f";
    expect((await submit(unknown, 0, 0, member(1))).status).toBe(404);
    expect((await h.request(`/v1/populations/${unknown}`)).status).toBe(404);
    expect((await h.request(`/v1/populations/${p.id}`, { key: h.keyB })).status).toBe(404);
    expect((await submit(p.id, 0, 0, member(1), h.keyB)).status).toBe(404);
    expect((await h.request(`/v1/populations/${p.id}/rounds/1`)).status).toBe(404);
    expect((await h.request(`/v1/populations/${p.id}/rounds/0/members/5/weights`)).status).toBe(422);
    expect((await h.request(`/v1/populations/${p.id}/rounds/0?wait=301`)).status).toBe(400);
    const garbage = await submit(p.id, 0, 0, rawSafetensors("{not json"));
    expect(garbage.status).toBe(422);
    expect(await counts()).toEqual(afterForeign);
    expect(afterForeign.checkpoints).toBe((before.checkpoints ?? 0) + 1);
  });
});

describe("a population whose round's merge fails", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem"); // no worker: the round's job stays queued
  });
  afterAll(() => h.close());

  it("shows the round merging, then failed with its job, and the population failed", async () => {
    const created = await h.request("/v1/populations", {
      method: "POST",
      body: JSON.stringify({ name: "doomed", size: 2, method: "papa-2" }),
      headers: json,
    });
    const p = (await created.json()) as PopulationBody;
    for (const m of [0, 1]) {
      await h.request(`/v1/populations/${p.id}/rounds/0/members/${m}`, {
        method: "PUT",
        body: member(m),
        headers: octets,
      });
    }
    const merging = (await (await h.request(`/v1/populations/${p.id}/rounds/0`)).json()) as RoundBody;
    expect(merging.status).toBe("merging");
    const early = await h.request(`/v1/populations/${p.id}/rounds/0/members/0/weights`);
    expect(early.status).toBe(409);
    expect(early.headers.get("retry-after")).toBe("1");
    expect((await h.request(`/v1/populations/${p.id}/finish`, { method: "POST" })).status).toBe(409);

    await h.request(`/v1/jobs/${merging.job_id}/cancel`, { method: "POST" });
    const population = (await (await h.request(`/v1/populations/${p.id}`)).json()) as PopulationBody;
    expect(population.status).toBe("failed");
    expect(population.rounds.map((r) => r.status)).toEqual(["failed"]);
    const failed = await h.request(`/v1/populations/${p.id}/rounds/0/members/0/weights`);
    expect(failed.status).toBe(409);
    expect(((await failed.json()) as { detail: string }).detail).toContain("failed");
    expect(
      (
        await h.request(`/v1/populations/${p.id}/rounds/1/members/0`, {
          method: "PUT",
          body: member(1),
          headers: octets,
        })
      ).status,
    ).toBe(409);
  });
});
