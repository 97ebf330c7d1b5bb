import { createHash } from "node:crypto";
import { Readable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DatabaseKind, StoreKind } from "./helpers/backends.js";
import { type Harness, startHarness, upload } from "./helpers/harness.js";
import { mergeAndWait, postMerge, waitForJob } from "./helpers/jobs.js";
import { buildSafetensors, rawSafetensors } from "./helpers/safetensors.js";
import { filesForm, INDEX, SHARD_1, SHARD_2, sharded, tensors, uploadFiles } from "./helpers/sharded.js";

const sha256 = (bytes: Uint8Array) => createHash("sha256").update(bytes).digest("hex");

interface FileBody {
  name: string;
  url: string;
  size_bytes: number;
  sha256: string;
}
interface CheckpointBody {
  id: string;
  sha256: string;
  size_bytes: number;
  tensor_count: number;
  parameter_count: number;
  weights_url: string | null;
  files: FileBody[];
}

/** Tensor name to raw data bytes of a safetensors file. */
function tensorsOf(file: Buffer): Map<string, Buffer> {
  const n = Number(file.readBigUInt64LE(0));
  const header = JSON.parse(file.subarray(8, 8 + n).toString()) as Record<
    string,
    { data_offsets?: [number, number] }
  >;
  const out = new Map<string, Buffer>();
  for (const [name, entry] of Object.entries(header)) {
    if (!entry.data_offsets) continue;
    out.set(name, file.subarray(8 + n + entry.data_offsets[0], 8 + n + entry.data_offsets[1]));
  }
  return out;
}

describe.each<[DatabaseKind, StoreKind]>([
  ["pglite", "filesystem"],
  ["postgres", "s3"],
])("multi-file checkpoints on %s + %s", (db, store) => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness(db, store, { worker: true });
  });
  afterAll(() => h.close());

  const created = async (files: Record<string, Buffer>, name = "toy") => {
    const res = await uploadFiles(h, files, name);
    const text = await res.text();
    expect(res.status, text).toBe(201);
    return JSON.parse(text) as CheckpointBody;
  };
  const download = async (url: string) => {
    const res = await h.request(url);
    expect(res.status, url).toBe(200);
    return Buffer.from(await res.arrayBuffer());
  };

  it("stores sharded weights with their index and companion files, each downloadable with Range and ETag", async () => {
    const files = sharded(1);
    const body = await created(files);
    expect(body.files.map((f) => f.name).sort()).toEqual(Object.keys(files).sort());
    for (const f of body.files) {
      const bytes = files[f.name] as Buffer;
      expect(f).toMatchObject({ size_bytes: bytes.length, sha256: sha256(bytes) });
      const res = await h.request(f.url);
      expect(res.headers.get("etag")).toBe(`"${sha256(bytes)}"`);
      expect(Buffer.from(await res.arrayBuffer())).toEqual(bytes);
      const part = await h.request(f.url, { headers: { Range: "bytes=2-5" } });
      expect(part.status).toBe(206);
      expect(Buffer.from(await part.arrayBuffer())).toEqual(bytes.subarray(2, 6));
    }
    // The checkpoint's digest is that of its files' sha256sum lines, in name order.
    const lines = Object.keys(files)
      .sort()
      .map((name) => `${sha256(files[name] as Buffer)}  ${name}\n`)
      .join("");
    expect(body.sha256).toBe(sha256(Buffer.from(lines)));
    expect(body).toMatchObject({
      size_bytes: Object.values(files).reduce((n, b) => n + b.length, 0),
      tensor_count: 4,
      parameter_count: 4 + 3 + 2 + 1,
      weights_url: null,
    });
    const weights = await h.request(`/v1/checkpoints/${body.id}/weights`);
    expect(weights.status).toBe(404);
    expect(await weights.text()).toContain(INDEX);
    const missing = await h.request(`/v1/checkpoints/${body.id}/files/vocab.txt`);
    expect(missing.status).toBe(404);
    const byVersion = await h.request(`/v1/models/toy/versions/latest/files/config.json`);
    expect(Buffer.from(await byVersion.arrayBuffer())).toEqual(files["config.json"]);
  });

  it("merges sharded checkpoints into sharded outputs, bit-exact with the same merge of single files", async () => {
    const [a, b] = [await created(sharded(2), "sa"), await created(sharded(3), "sb")];
    const single = async (k: number) =>
      (await (await upload(h, buildSafetensors(tensors(k)), `s${k}`)).json()) as CheckpointBody;
    const [sa, sb] = [await single(2), await single(3)];
    const reference = await mergeAndWait(h, {
      method: "weighted",
      coefficients: [0.3, 0.7],
      inputs: [sa.id, sb.id],
    });
    const merged = await mergeAndWait(h, {
      method: "weighted",
      coefficients: [0.3, 0.7],
      inputs: [a.id, b.id],
      name: "toy-soup",
    });
    const expected = tensorsOf(
      await download(`/v1/checkpoints/${reference.result?.checkpoints[0]?.id}/weights`),
    );
    const out = (await (
      await h.request(`/v1/checkpoints/${merged.result?.checkpoints[0]?.id}`)
    ).json()) as CheckpointBody;
    const names = out.files.map((f) => f.name).sort();
    expect(names).toEqual(["config.json", SHARD_1, SHARD_2, INDEX, "tokenizer.json"]);
    const got = new Map<string, Buffer>();
    const shardOf = new Map<string, string>();
    for (const shard of [SHARD_1, SHARD_2]) {
      const bytes = await download(`/v1/checkpoints/${out.id}/files/${shard}`);
      const n = Number(bytes.readBigUInt64LE(0));
      expect(JSON.parse(bytes.subarray(8, 8 + n).toString()).__metadata__).toMatchObject({
        format: "pt",
        "papa.method": "weighted",
      });
      for (const [name, data] of tensorsOf(bytes)) {
        got.set(name, data);
        shardOf.set(name, shard);
      }
    }
    expect(got).toEqual(expected);
    expect(Object.fromEntries(shardOf)).toEqual(JSON.parse(sharded(2)[INDEX]?.toString() ?? "").weight_map);
    const index = JSON.parse((await download(`/v1/checkpoints/${out.id}/files/${INDEX}`)).toString());
    expect(index).toEqual({
      metadata: { total_size: [...expected.values()].reduce((n, d) => n + d.length, 0) },
      weight_map: Object.fromEntries(shardOf),
    });
    // Companion files are the first input's.
    expect(await download(`/v1/checkpoints/${out.id}/files/tokenizer.json`)).toEqual(
      sharded(2)["tokenizer.json"],
    );

    // A single file first: the output is one file, whatever the other inputs are.
    const mixed = await mergeAndWait(h, {
      method: "weighted",
      coefficients: [0.3, 0.7],
      inputs: [sa.id, b.id],
    });
    const one = (await (
      await h.request(`/v1/checkpoints/${mixed.result?.checkpoints[0]?.id}`)
    ).json()) as CheckpointBody;
    expect(one.files.map((f) => f.name)).toEqual(["model.safetensors"]);
    expect(tensorsOf(await download(one.weights_url ?? ""))).toEqual(expected);
  });

  it("leaves no output file behind when a sharded merge fails on its way, retries included", async () => {
    const [a, b] = [await created(sharded(9), "broken-a"), await created(sharded(10), "broken-b")];
    // The store loses the end of b's second shard (into an averaged tensor): its header still reads.
    const key = `tenants/${h.tenantA}/checkpoints/${b.id}/${SHARD_2}`;
    const shard = sharded(10)[SHARD_2] as Buffer;
    await h.ctx.store.put(key, Readable.from([shard.subarray(0, shard.length - 12)]));
    const stored = () => h.ctx.store.list(`tenants/${h.tenantA}/checkpoints/`);
    const before = await stored();
    const res = await postMerge(h, { method: "papa-all", inputs: [a.id, b.id] });
    expect(res.status).toBe(202);
    const job = await waitForJob(h, ((await res.json()) as { id: string }).id);
    expect(job.status).toBe("failed");
    expect(await stored()).toEqual(before);
  });

  it("refuses layouts that do not hold together, and invalid or oversized files, leaving nothing behind", async () => {
    const before = await h.leftovers();
    const good = sharded(4);
    const index = (map: Record<string, string>) => Buffer.from(JSON.stringify({ weight_map: map }));
    const both = buildSafetensors(tensors(4).slice(0, 3));
    const cases: [string, [string, Buffer | string][], number, string][] = [
      [
        "shards without an index",
        [
          [SHARD_1, good[SHARD_1] as Buffer],
          [SHARD_2, good[SHARD_2] as Buffer],
        ],
        422,
        INDEX,
      ],
      [
        "a tensor in two shards",
        [
          [SHARD_1, good[SHARD_1] as Buffer],
          [SHARD_2, both],
          [INDEX, good[INDEX] as Buffer],
        ],
        422,
        "embed.weight",
      ],
      [
        "a shard the index does not name",
        [...Object.entries(good), ["model-extra.safetensors", buildSafetensors(tensors(4).slice(3))]],
        422,
        "model-extra.safetensors",
      ],
      [
        "an index naming a shard not sent",
        Object.entries(good).filter(([name]) => name !== SHARD_2),
        422,
        SHARD_2,
      ],
      [
        "an index that puts a tensor in the wrong shard",
        [
          ...Object.entries(good).filter(([name]) => name !== INDEX),
          [
            INDEX,
            index({
              "embed.weight": SHARD_2,
              "layers.0.weight": SHARD_1,
              "layers.1.weight": SHARD_2,
              steps: SHARD_2,
            }),
          ],
        ],
        422,
        "embed.weight",
      ],
      [
        "an index with a key twice",
        [
          ...Object.entries(good).filter(([n]) => n !== INDEX),
          [INDEX, '{"weight_map": {"a": "x", "a": "y"}}'],
        ],
        422,
        "duplicate key",
      ],
      [
        "a truncated shard",
        [
          [SHARD_1, (good[SHARD_1] as Buffer).subarray(0, 30)],
          [SHARD_2, good[SHARD_2] as Buffer],
          [INDEX, good[INDEX] as Buffer],
        ],
        422,
        SHARD_1,
      ],
      ["a bad header", [["model.safetensors", rawSafetensors('{"a": 1}')]], 422, "model.safetensors"],
      [
        "a file name with a space",
        [
          ["model.safetensors", good[SHARD_2] as Buffer],
          ["my config.json", "{}"],
        ],
        422,
        "my config.json",
      ],
      [
        "a file sent twice",
        [
          ["model.safetensors", good[SHARD_2] as Buffer],
          ["config.json", "{}"],
          ["config.json", "{}"],
        ],
        422,
        "twice",
      ],
      ["no weights", [["config.json", "{}"]], 422, "no weights"],
      [
        "a companion over the upload limit",
        [
          ["model.safetensors", good[SHARD_2] as Buffer],
          ["tokenizer.json", Buffer.alloc(70 * 1024, 32)],
        ],
        413,
        "tokenizer.json",
      ],
    ];
    for (const [what, files, status, mention] of cases) {
      const res = await h.request("/v1/checkpoints?name=bad", { method: "POST", body: filesForm(files) });
      const text = await res.text();
      expect(res.status, `${what}: ${text}`).toBe(status);
      expect(res.headers.get("content-type")).toBe("application/problem+json");
      expect(text, what).toContain(mention);
    }
    const field = new FormData();
    field.append("name", "not a file");
    const refused = await h.request("/v1/checkpoints?name=bad", { method: "POST", body: field });
    expect(refused.status).toBe(422);
    expect(await h.leftovers()).toEqual(before);
  });

  it("keeps sharded checkpoints out of populations, whose members are one file each", async () => {
    const c = await created(sharded(5), "pop-member");
    const pop = (await (
      await h.request("/v1/populations", {
        method: "POST",
        body: JSON.stringify({ name: "p", size: 2, method: "papa-all" }),
        headers: { "Content-Type": "application/json" },
      })
    ).json()) as { id: string };
    const res = await h.request(`/v1/populations/${pop.id}/rounds/0/members/0`, {
      method: "PUT",
      body: JSON.stringify({ checkpoint_id: c.id }),
      headers: { "Content-Type": "application/json" },
    });
    expect(res.status).toBe(422);
    expect(await res.text()).toContain("sharded");
    const start = await h.request("/v1/populations", {
      method: "POST",
      body: JSON.stringify({ name: "q", size: 2, method: "papa-all", initial_checkpoint_id: c.id }),
      headers: { "Content-Type": "application/json" },
    });
    expect(start.status).toBe(422);
    expect(await start.text()).toContain("sharded");
  });

  it("deletes every file of a deleted multi-file checkpoint, once no twin output shares them", async () => {
    const c = await created(sharded(6), "gone");
    const prefix = `tenants/${h.tenantA}/checkpoints/${c.id}/`;
    expect((await h.ctx.store.list(prefix)).length).toBe(5);
    expect((await h.request(`/v1/checkpoints/${c.id}`, { method: "DELETE" })).status).toBe(204);
    expect(await h.ctx.store.list(prefix)).toEqual([]);
    expect((await h.request(`/v1/checkpoints/${c.id}/files/config.json`)).status).toBe(410);

    // PAPA-2 of two inputs gives both outputs the one pair: one set of files, which deleting
    // one output leaves to the other.
    const inputs = [(await created(sharded(7), "twin-a")).id, (await created(sharded(8), "twin-b")).id];
    const merge = await mergeAndWait(h, { method: "papa-2", inputs });
    const [first, second] = merge.result?.checkpoints ?? [];
    expect((await h.request(`/v1/checkpoints/${first?.id}`, { method: "DELETE" })).status).toBe(204);
    const shared = `tenants/${h.tenantA}/checkpoints/${first?.id}/`;
    expect((await h.ctx.store.list(shared)).length).toBe(5);
    expect((await h.request(`/v1/checkpoints/${second?.id}/files/${SHARD_2}`)).status).toBe(200);
    expect((await h.request(`/v1/checkpoints/${second?.id}`, { method: "DELETE" })).status).toBe(204);
    expect(await h.ctx.store.list(shared)).toEqual([]);
  });
});
