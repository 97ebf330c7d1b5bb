import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DatabaseKind, StoreKind } from "./helpers/backends.js";
import { type Harness, startHarness, upload } from "./helpers/harness.js";
import { mergeAndWait } from "./helpers/jobs.js";
import { smallCheckpoint } from "./helpers/safetensors.js";

interface CheckpointBody {
  id: string;
  name: string;
  version: number;
  tags: string[];
  description: string | null;
  sha256: string;
}
interface ModelBody {
  name: string;
  latest_version: number | null;
  version_count: number;
  aliases: { alias: string; version: number; checkpoint_id: string }[];
  versions: CheckpointBody[];
  next_cursor: string | null;
}
interface MetricBody {
  value: number;
  current: boolean;
}

describe.each<[DatabaseKind, StoreKind]>([
  ["pglite", "filesystem"],
  ["postgres", "s3"],
])("the model registry on %s + %s", (db, store) => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness(db, store, { worker: true });
  });
  afterAll(() => h.close());

  const json = async <T>(res: Response | Promise<Response>, status = 200): Promise<T> => {
    const r = await res;
    const text = await r.text();
    expect(r.status, text).toBe(status);
    return JSON.parse(text) as T;
  };
  const created = (name: string, seed: number, key?: string) =>
    json<CheckpointBody>(upload(h, smallCheckpoint(seed), name, key ? { key } : {}), 201);
  const sha = async (path: string, status = 200) => {
    const res = await h.request(path);
    expect(res.status, await res.clone().text()).toBe(status);
    return res.headers.get("etag");
  };
  const send = (path: string, method: string, body: unknown, type = "application/json") =>
    h.request(path, { method, body: JSON.stringify(body), headers: { "Content-Type": type } });
  const file = (name: string, ref: string) => `/v1/models/${name}/versions/${ref}/files/model.safetensors`;

  it("makes every checkpoint registered under a name its next version, concurrent uploads and merge outputs included", async () => {
    const first = await created("resnet", 1);
    const second = await created("resnet", 2);
    const other = await created("vit", 3);
    expect([first.version, second.version, other.version]).toEqual([1, 2, 1]);

    const racing = await Promise.all([4, 5, 6, 7, 8].map((seed) => created("racing", seed)));
    expect(racing.map((c) => c.version).sort()).toEqual([1, 2, 3, 4, 5]);

    const merge = await mergeAndWait(h, {
      method: "papa-all",
      inputs: [first.id, second.id],
      name: "resnet",
    });
    const output = await json<CheckpointBody>(
      h.request(`/v1/checkpoints/${merge.result?.checkpoints[0]?.id}`),
    );
    expect(output).toMatchObject({ name: "resnet", version: 3 });

    const model = await json<ModelBody>(h.request("/v1/models/resnet"));
    expect(model).toMatchObject({ name: "resnet", latest_version: 3, version_count: 3, aliases: [] });
    expect(model.versions.map((v) => v.version)).toEqual([3, 2, 1]);
    const paged = await json<ModelBody>(h.request("/v1/models/resnet?limit=2"));
    const rest = await json<ModelBody>(h.request(`/v1/models/resnet?limit=2&cursor=${paged.next_cursor}`));
    expect([...paged.versions, ...rest.versions].map((v) => v.version)).toEqual([3, 2, 1]);
    expect(rest.next_cursor).toBeNull();
  });

  it("lists models by name, a page at a time, and by prefix", async () => {
    await created("resnet-b", 9);
    await created("Resnet", 10);
    const names: string[] = [];
    let cursor: string | null = null;
    do {
      const page: { items: { name: string; latest_version: number }[]; next_cursor: string | null } =
        await json(h.request(`/v1/models?limit=2${cursor ? `&cursor=${cursor}` : ""}`));
      names.push(...page.items.map((m) => m.name));
      cursor = page.next_cursor;
    } while (cursor);
    expect(new Set(names).size).toBe(names.length);
    expect(names).toEqual(expect.arrayContaining(["Resnet", "racing", "resnet", "resnet-b", "vit"]));
    const prefixed = await json<{ items: { name: string; latest_version: number; version_count: number }[] }>(
      h.request("/v1/models?name_prefix=resn"),
    );
    expect(prefixed.items).toEqual([
      expect.objectContaining({ name: "resnet", latest_version: 3, version_count: 3 }),
      expect.objectContaining({ name: "resnet-b", latest_version: 1, version_count: 1 }),
    ]);
    const checkpoints = await json<{ items: CheckpointBody[] }>(
      h.request("/v1/checkpoints?name_prefix=resn&limit=200"),
    );
    expect(new Set(checkpoints.items.map((c) => c.name))).toEqual(new Set(["resnet", "resnet-b"]));
  });

  it("serves a version's file by number, by alias and as latest; aliases move, and latest skips deleted versions", async () => {
    const v = async (n: number) =>
      (await json<ModelBody>(h.request("/v1/models/resnet"))).versions.find(
        (c) => c.version === n,
      ) as CheckpointBody;
    const [v1, v2, v3] = [await v(1), await v(2), await v(3)];
    expect(await sha(file("resnet", "2"))).toBe(`"${v2.sha256}"`);
    expect(await sha(file("resnet", "latest"))).toBe(`"${v3.sha256}"`);

    const alias = await json<{ version: number; checkpoint_id: string }>(
      send("/v1/models/resnet/aliases/production", "PUT", { version: 1 }),
    );
    expect(alias).toMatchObject({ version: 1, checkpoint_id: v1.id });
    expect(await sha(file("resnet", "production"))).toBe(`"${v1.sha256}"`);
    await json(send("/v1/models/resnet/aliases/production", "PUT", { version: 3 }));
    expect(await sha(file("resnet", "production"))).toBe(`"${v3.sha256}"`);
    expect((await json<ModelBody>(h.request("/v1/models/resnet"))).aliases).toEqual([
      expect.objectContaining({ alias: "production", version: 3, checkpoint_id: v3.id }),
    ]);

    expect((await h.request(`/v1/checkpoints/${v3.id}`, { method: "DELETE" })).status).toBe(204);
    expect(await sha(file("resnet", "latest"))).toBe(`"${v2.sha256}"`);
    await sha(file("resnet", "production"), 410);
    await sha(file("resnet", "3"), 410);
    expect(await json<ModelBody>(h.request("/v1/models/resnet"))).toMatchObject({
      latest_version: 2,
      version_count: 2,
    });
    // A deleted version cannot be aliased; an unknown one neither.
    await json(send("/v1/models/resnet/aliases/staging", "PUT", { version: 3 }), 422);
    await json(send("/v1/models/resnet/aliases/staging", "PUT", { version: 7 }), 422);

    expect((await h.request("/v1/models/resnet/aliases/production", { method: "DELETE" })).status).toBe(204);
    await sha(file("resnet", "production"), 404);
    expect((await h.request("/v1/models/resnet/aliases/production", { method: "DELETE" })).status).toBe(404);
    await sha(file("resnet", "9"), 404);
    await sha(file("nothing-here", "latest"), 404);
  });

  it("keeps models per tenant: another tenant neither sees them nor shares their versions", async () => {
    expect((await h.request("/v1/models/vit", { key: h.keyB })).status).toBe(404);
    await sha(file("vit", "1"));
    expect((await h.request(file("vit", "1"), { key: h.keyB })).status).toBe(404);
    expect((await created("vit", 11, h.keyB)).version).toBe(1);
    expect((await created("vit", 12)).version).toBe(2);
    const own = await json<{ items: { name: string }[] }>(h.request("/v1/models", { key: h.keyB }));
    expect(own.items.map((m) => m.name)).toEqual(["vit"]);
  });

  it("refuses names that are not Hugging Face style, and aliases it keeps itself", async () => {
    for (const name of ["two words", "-lead", "trail.", "a..b", "a--b", "x".repeat(97), "é"]) {
      expect((await upload(h, smallCheckpoint(1), name)).status, name).toBe(400);
    }
    expect((await upload(h, smallCheckpoint(1), `${"x".repeat(95)}1`)).status).toBe(201);
    await json(send("/v1/models/resnet/aliases/latest", "PUT", { version: 1 }), 422);
    await json(send("/v1/models/resnet/aliases/9lives", "PUT", { version: 1 }), 400);
  });

  it("edits tags and description as a JSON merge patch, and returns them everywhere", async () => {
    const c = await created("tagged", 13);
    const path = `/v1/checkpoints/${c.id}`;
    const patched = await json<CheckpointBody>(
      send(
        path,
        "PATCH",
        { tags: ["candidate", "task:vision"], description: "first try" },
        "application/merge-patch+json",
      ),
    );
    expect(patched).toMatchObject({
      tags: ["candidate", "task:vision"],
      description: "first try",
      version: 1,
    });
    // Members left out stay; null clears.
    expect(await json<CheckpointBody>(send(path, "PATCH", { description: null }))).toMatchObject({
      tags: ["candidate", "task:vision"],
      description: null,
    });
    const listed = await json<{ items: CheckpointBody[] }>(h.request("/v1/checkpoints?name=tagged"));
    expect(listed.items[0]?.tags).toEqual(["candidate", "task:vision"]);
    const model = await json<ModelBody>(h.request("/v1/models/tagged"));
    expect(model.versions[0]?.tags).toEqual(["candidate", "task:vision"]);
    expect(await json<CheckpointBody>(send(path, "PATCH", { tags: null }))).toMatchObject({ tags: [] });
    await json(send(path, "PATCH", { tags: ["ok", "ok"] }), 422);
    await json(send(path, "PATCH", { name: "renamed" }), 422);
    const asB = {
      method: "PATCH",
      key: h.keyB,
      body: '{"tags": ["mine"]}',
      headers: { "Content-Type": "application/json" },
    };
    await json(h.request(path, asB), 404);
    expect(await json<CheckpointBody>(h.request(path))).toMatchObject({ tags: [] });
  });

  it("searches by tags (all of them), job and parent", async () => {
    const [a, b, c] = [await created("search", 21), await created("search", 22), await created("search", 23)];
    await json(send(`/v1/checkpoints/${a.id}`, "PATCH", { tags: ["red", "round"] }));
    await json(send(`/v1/checkpoints/${b.id}`, "PATCH", { tags: ["red"] }));
    await json(send(`/v1/checkpoints/${c.id}`, "PATCH", { tags: ["round"] }));
    const ids = async (query: string) =>
      (await json<{ items: CheckpointBody[] }>(h.request(`/v1/checkpoints?${query}`))).items.map((x) => x.id);
    expect(await ids("tag=red")).toEqual([b.id, a.id]);
    expect(await ids("tag=red&tag=round")).toEqual([a.id]);
    expect(await ids("tag=red&sort=created_at")).toEqual([a.id, b.id]);

    const merge = await mergeAndWait(h, {
      method: "papa-2",
      inputs: [a.id, b.id, c.id],
      name: "pairs",
      seed: 1,
    });
    const outputs = merge.result?.checkpoints.map((x) => x.id) ?? [];
    expect(outputs).toHaveLength(3);
    expect((await ids(`job_id=${merge.id}`)).sort()).toEqual([...outputs].sort());
    const lineage = await Promise.all(
      outputs.map(async (id) => ({
        id,
        parents: (await json<{ parents: { checkpoint_id: string }[] }>(h.request(`/v1/checkpoints/${id}`)))
          .parents,
      })),
    );
    const childrenOfA = lineage
      .filter((o) => o.parents.some((p) => p.checkpoint_id === a.id))
      .map((o) => o.id);
    expect(childrenOfA.length).toBeGreaterThan(0);
    expect((await ids(`parent_id=${a.id}`)).sort()).toEqual(childrenOfA.sort());
    expect(await ids(`parent_id=${a.id}&job_id=${merge.id}&name=nothing`)).toEqual([]);
  });

  it("sorts by a metric's current value, best first, over pages, and filters by its range", async () => {
    const values = [0.7, 0.9, 0.8, 0.9, 0.6];
    const ranked = await Promise.all(values.map((_, i) => created("ranked", 30 + i)));
    const record = (id: string, value: number, dataset = "mnist") =>
      json(
        send(`/v1/checkpoints/${id}/metrics`, "POST", { dataset, split: "test", name: "accuracy", value }),
        201,
      );
    for (const [i, c] of ranked.entries()) await record(c.id, values[i] as number);
    // Another dataset's accuracy does not count, and a re-measured value replaces the old one.
    await record((ranked[4] as CheckpointBody).id, 0.99, "other");
    await record((ranked[0] as CheckpointBody).id, 0.5);
    await record((ranked[0] as CheckpointBody).id, 0.95);

    const metric = "metric=accuracy&metric_dataset=mnist&metric_split=test&name=ranked";
    const walk = async (sort: string) => {
      const seen: string[] = [];
      let cursor: string | null = null;
      do {
        const page: { items: CheckpointBody[]; next_cursor: string | null } = await json(
          h.request(`/v1/checkpoints?${metric}&sort=${sort}&limit=2${cursor ? `&cursor=${cursor}` : ""}`),
        );
        seen.push(...page.items.map((c) => c.id));
        cursor = page.next_cursor;
      } while (cursor);
      return seen;
    };
    const byValue = [
      [0.95, ranked[0]],
      [0.9, ranked[1]],
      [0.9, ranked[3]],
      [0.8, ranked[2]],
      [0.6, ranked[4]],
    ] as [number, CheckpointBody][];
    // Ties by id, in the sort's direction.
    const ties = (x: [number, CheckpointBody], y: [number, CheckpointBody]) =>
      x[0] === y[0] ? (x[1].id < y[1].id ? 1 : -1) : 0;
    const best = [...byValue].sort(ties).map(([, c]) => c.id);
    expect(await walk("-metric")).toEqual(best);
    expect(await walk("metric")).toEqual([...best].reverse());

    const ids = async (query: string) =>
      (await json<{ items: CheckpointBody[] }>(h.request(`/v1/checkpoints?${metric}&${query}`))).items.map(
        (c) => c.id,
      );
    expect(await ids("metric_min=0.8&metric_max=0.9&sort=-metric")).toEqual(best.slice(1, 4));
    expect((await ids("metric_min=0.9")).sort()).toEqual(best.slice(0, 3).sort());

    const history = await json<{ items: MetricBody[] }>(
      h.request(`/v1/checkpoints/${(ranked[0] as CheckpointBody).id}/metrics`),
    );
    expect(history.items.map((m) => [m.value, m.current])).toEqual([
      [0.7, false],
      [0.5, false],
      [0.95, true],
    ]);
    await json(h.request(`/v1/checkpoints?metric=accuracy&sort=-metric`), 422);
    await json(h.request(`/v1/checkpoints?sort=-metric`), 422);
    await json(h.request(`/v1/checkpoints?metric_min=0.5`), 422);
    // A cursor is for the search it came from.
    const page = await json<{ next_cursor: string }>(
      h.request(`/v1/checkpoints?${metric}&sort=-metric&limit=1`),
    );
    await json(h.request(`/v1/checkpoints?cursor=${page.next_cursor}`), 422);
  });

  it("serves a listing and a checkpoint again only until something they show changes, however it changed", async () => {
    const [a, b] = [await created("listed", 41), await created("listed", 42)];
    type Listed = CheckpointBody & {
      status: string;
      parents: { checkpoint_id: string }[];
      metrics: MetricBody[];
    };
    const list = async () =>
      (await json<{ items: Listed[] }>(h.request("/v1/checkpoints?name=listed"))).items;
    const get = (id: string) => json<Listed>(h.request(`/v1/checkpoints/${id}`));
    expect((await list()).map((x) => x.id)).toEqual([b.id, a.id]);
    expect((await get(a.id)).description).toBeNull();
    // Changed behind the count (its trigger off), the bodies are the ones kept: they are served again.
    const trigger = (on: "ENABLE" | "DISABLE") =>
      h.ctx.db.execute(sql.raw(`ALTER TABLE checkpoints ${on} TRIGGER checkpoints_updated`));
    await trigger("DISABLE");
    await h.ctx.db.execute(sql`update checkpoints set description = 'unseen' where id = ${a.id}`);
    await trigger("ENABLE");
    expect((await list())[1]?.description).toBeNull();
    expect((await get(a.id)).description).toBeNull();
    // Each change shows at once, whether the API made it or not (another process, SQL by hand).
    await h.ctx.db.execute(sql`update checkpoints set description = 'by hand' where id = ${a.id}`);
    expect((await list())[1]?.description).toBe("by hand");
    expect((await get(a.id)).description).toBe("by hand");
    await json(send(`/v1/checkpoints/${a.id}`, "PATCH", { tags: ["kept"] }));
    expect((await list())[1]?.tags).toEqual(["kept"]);
    await json(
      send(`/v1/checkpoints/${b.id}/metrics`, "POST", {
        dataset: "d",
        split: "test",
        name: "acc",
        value: 0.5,
      }),
      201,
    );
    expect((await get(b.id)).metrics.map((m) => m.value)).toEqual([0.5]);
    expect((await list())[0]?.metrics.map((m) => m.value)).toEqual([0.5]);
    await h.ctx.db.execute(
      sql`insert into lineage_edges (parent_id, child_id, coefficient, method) values (${a.id}, ${b.id}, 1, 'by-hand')`,
    );
    expect((await get(b.id)).parents.map((p) => p.checkpoint_id)).toEqual([a.id]);
    expect((await list())[0]?.parents.map((p) => p.checkpoint_id)).toEqual([a.id]);
    const c = await created("listed", 43);
    expect((await list()).map((x) => x.id)).toEqual([c.id, b.id, a.id]);
    expect((await h.request(`/v1/checkpoints/${c.id}`, { method: "DELETE" })).status).toBe(204);
    expect((await list()).map((x) => x.id)).toEqual([b.id, a.id]);
    expect((await get(c.id)).status).toBe("deleted");
    // Another tenant's reads are its own: the same id is not found, and its listing is empty.
    expect((await h.request(`/v1/checkpoints/${a.id}`, { key: h.keyB })).status).toBe(404);
    const theirs = await json<{ items: Listed[] }>(h.request("/v1/checkpoints?name=listed", { key: h.keyB }));
    expect(theirs.items).toEqual([]);
  });
});
