import { createHash } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DatabaseKind, StoreKind } from "./helpers/backends.js";
import { expectDocumented } from "./helpers/contract.js";
import { type Harness, startHarness, TEST_LIMITS, upload } from "./helpers/harness.js";
import { buildSafetensors, f32, rawSafetensors, smallCheckpoint } from "./helpers/safetensors.js";

interface CheckpointBody {
  id: string;
  name: string;
  status: string;
  size_bytes: number;
  sha256: string;
  tensor_count: number;
  parameter_count: number;
  dtypes: string[];
  metadata: Record<string, string> | null;
  deleted_at: string | null;
  weights_url: string;
}
interface Problem {
  type: string;
  status: number;
  detail: string;
  request_id: string;
  errors?: { in: string; name?: string; message: string }[];
}

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

describe.each<[DatabaseKind, StoreKind]>([
  ["pglite", "filesystem"],
  ["postgres", "s3"],
])("checkpoints API on %s + %s", (db, store) => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness(db, store);
  });
  afterAll(() => h.close());

  async function created(bytes: Buffer, name = "model"): Promise<CheckpointBody> {
    const res = await upload(h, bytes, name);
    expect(res.status).toBe(201);
    return (await expectDocumented("createCheckpoint", res)) as CheckpointBody;
  }

  async function expectNothingLeft(before: { objects: string[]; checkpoints: number }) {
    expect(await h.leftovers()).toEqual(before);
  }

  it("uploads, shows, lists and downloads exactly the same bytes", async () => {
    const bytes = smallCheckpoint(2);
    const res = await upload(h, bytes, "resnet-member-0");
    expect(res.status).toBe(201);
    const body = (await expectDocumented("createCheckpoint", res)) as CheckpointBody;
    expect(res.headers.get("location")).toBe(`/v1/checkpoints/${body.id}`);
    expect(body).toMatchObject({
      name: "resnet-member-0",
      version: 1,
      tags: [],
      description: null,
      status: "available",
      size_bytes: bytes.length,
      sha256: sha256(bytes),
      tensor_count: 3,
      parameter_count: 10,
      dtypes: ["F32", "I64"],
      metadata: { format: "pt", seed: "2" },
      deleted_at: null,
    });

    const shown = await h.request(`/v1/checkpoints/${body.id}`);
    expect(await expectDocumented("getCheckpoint", shown)).toEqual(body);

    const listed = await h.request("/v1/checkpoints?name=resnet-member-0");
    const list = (await expectDocumented("listCheckpoints", listed)) as { items: CheckpointBody[] };
    expect(list.items.map((c) => c.id)).toEqual([body.id]);

    const download = await h.request(body.weights_url);
    expect(download.status).toBe(200);
    expect(download.headers.get("etag")).toBe(`"${sha256(bytes)}"`);
    expect(download.headers.get("content-length")).toBe(String(bytes.length));
    expect(download.headers.get("accept-ranges")).toBe("bytes");
    expect(Buffer.from(await download.arrayBuffer()).equals(bytes)).toBe(true);
  });

  it("serves byte ranges, conditional requests and HEAD", async () => {
    const bytes = smallCheckpoint(4);
    const { id } = await created(bytes);
    const url = `/v1/checkpoints/${id}/weights`;
    const cases: [string, number, number][] = [
      ["bytes=0-7", 0, 8],
      ["bytes=8-", 8, bytes.length],
      ["bytes=-5", bytes.length - 5, bytes.length],
      [`bytes=10-${bytes.length + 100}`, 10, bytes.length],
    ];
    for (const [range, start, end] of cases) {
      const res = await h.request(url, { headers: { Range: range } });
      expect(res.status, range).toBe(206);
      expect(res.headers.get("content-range")).toBe(`bytes ${start}-${end - 1}/${bytes.length}`);
      expect(res.headers.get("content-length")).toBe(String(end - start));
      expect(Buffer.from(await res.arrayBuffer()).equals(bytes.subarray(start, end))).toBe(true);
    }
    const outside = await h.request(url, { headers: { Range: `bytes=${bytes.length}-` } });
    expect(outside.status).toBe(416);
    expect(outside.headers.get("content-range")).toBe(`bytes */${bytes.length}`);
    await expectDocumented("getCheckpointWeights", outside);

    const multi = await h.request(url, { headers: { Range: "bytes=0-1,4-5" } });
    expect(multi.status).toBe(200);
    expect(Buffer.from(await multi.arrayBuffer()).equals(bytes)).toBe(true);

    const etag = `"${sha256(bytes)}"`;
    const notModified = await h.request(url, { headers: { "If-None-Match": etag } });
    expect(notModified.status).toBe(304);
    const staleIfRange = await h.request(url, { headers: { Range: "bytes=0-3", "If-Range": '"other"' } });
    expect(staleIfRange.status).toBe(200);
    await staleIfRange.arrayBuffer();

    const head = await h.request(url, { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(head.headers.get("content-length")).toBe(String(bytes.length));
  });

  it("redirects to a presigned URL on S3 with redirect=true, serves bytes otherwise", async () => {
    const bytes = smallCheckpoint(5);
    const { id } = await created(bytes);
    const res = await h.request(`/v1/checkpoints/${id}/weights?redirect=true`);
    await expectDocumented("getCheckpointWeights", res);
    if (store === "s3") {
      expect(res.status).toBe(302);
      const direct = await fetch(res.headers.get("location") ?? "");
      expect(Buffer.from(await direct.arrayBuffer()).equals(bytes)).toBe(true);
    } else {
      expect(res.status).toBe(200);
    }
  });

  it("paginates newest first with an opaque cursor and filters by name", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) ids.push((await created(smallCheckpoint(10 + i), "paged")).id);
    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const query: string = `/v1/checkpoints?name=paged&limit=2${cursor ? `&cursor=${cursor}` : ""}`;
      const page = (await expectDocumented("listCheckpoints", await h.request(query))) as {
        items: CheckpointBody[];
        next_cursor: string | null;
      };
      expect(page.items.length).toBeLessThanOrEqual(2);
      seen.push(...page.items.map((c) => c.id));
      cursor = page.next_cursor;
    } while (cursor);
    expect(seen).toEqual([...ids].reverse());

    const bad = await h.request("/v1/checkpoints?cursor=bm90LWFuLWlk");
    expect(bad.status).toBe(422);
    for (const limit of ["0", "201", "x"]) {
      const res = await h.request(`/v1/checkpoints?limit=${limit}`);
      expect(res.status, limit).toBe(400);
      await expectDocumented("listCheckpoints", res);
    }
  });

  it("deletes the bytes, keeps the record, and answers 410 for the weights", async () => {
    const before = await h.leftovers();
    const { id } = await created(smallCheckpoint(6), "to-delete");
    const del = await h.request(`/v1/checkpoints/${id}`, { method: "DELETE" });
    expect(del.status).toBe(204);
    await expectDocumented("deleteCheckpoint", del);
    expect((await h.request(`/v1/checkpoints/${id}`, { method: "DELETE" })).status).toBe(204);

    const shown = (await expectDocumented(
      "getCheckpoint",
      await h.request(`/v1/checkpoints/${id}`),
    )) as CheckpointBody;
    expect(shown.status).toBe("deleted");
    expect(shown.deleted_at).not.toBeNull();
    const weights = await h.request(`/v1/checkpoints/${id}/weights`);
    expect(weights.status).toBe(410);
    await expectDocumented("getCheckpointWeights", weights);
    const listed = (await (await h.request("/v1/checkpoints?name=to-delete")).json()) as { items: unknown[] };
    expect(listed.items).toEqual([]);
    const after = await h.leftovers();
    expect(after.objects).toEqual(before.objects);
    expect(after.checkpoints).toBe(before.checkpoints + 1);
  });

  describe("bad input gets a problem and leaves nothing behind", () => {
    const good = smallCheckpoint(7);
    const cases: [string, () => Promise<Response>, number, string][] = [
      ["a truncated file", () => upload(h, good.subarray(0, good.length - 3)), 422, "ends after"],
      ["an invalid JSON header", () => upload(h, rawSafetensors('{"w": nope}')), 422, "not valid JSON"],
      [
        "overlapping offsets",
        () =>
          upload(
            h,
            rawSafetensors(
              '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}',
              new Uint8Array(3),
            ),
          ),
        422,
        "contiguous",
      ],
      [
        "gapped offsets",
        () =>
          upload(
            h,
            rawSafetensors(
              '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}',
              new Uint8Array(3),
            ),
          ),
        422,
        "contiguous",
      ],
      [
        "an unknown dtype",
        () =>
          upload(
            h,
            rawSafetensors('{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}', new Uint8Array(1)),
          ),
        422,
        'unknown dtype "Q4"',
      ],
      [
        "a header over the cap",
        () =>
          upload(
            h,
            rawSafetensors(`{"__metadata__":{"pad":"${"x".repeat(TEST_LIMITS.maxSafetensorsHeaderBytes)}"}}`),
          ),
        413,
        `limit of ${TEST_LIMITS.maxSafetensorsHeaderBytes} bytes`,
      ],
      [
        "a body over the size limit, streamed without Content-Length",
        () =>
          upload(
            h,
            new ReadableStream({
              start(controller) {
                controller.enqueue(
                  buildSafetensors([
                    { name: "w", dtype: "F32", shape: [20000], data: f32(new Array(20000).fill(0)) },
                  ]),
                );
                controller.close();
              },
            }),
            "big",
            { duplex: "half" } as RequestInit,
          ),
        413,
        `limit of ${TEST_LIMITS.maxUploadBytes} bytes`,
      ],
      [
        "a declared Content-Length over the limit",
        () =>
          upload(h, Buffer.alloc(TEST_LIMITS.maxUploadBytes + 1), "big", {
            headers: { "Content-Length": String(TEST_LIMITS.maxUploadBytes + 1) },
          }),
        413,
        "limit is",
      ],
      [
        "a wrong content type",
        () => upload(h, good, "model", { headers: { "Content-Type": "application/json" } }),
        415,
        "application/octet-stream",
      ],
      [
        "a missing name",
        () =>
          h.request("/v1/checkpoints", {
            method: "POST",
            body: good,
            headers: { "Content-Type": "application/octet-stream" },
          }),
        400,
        "createCheckpoint",
      ],
      [
        "an unknown query parameter",
        () =>
          h.request("/v1/checkpoints?name=a&nmae=b", {
            method: "POST",
            body: good,
            headers: { "Content-Type": "application/octet-stream" },
          }),
        400,
        "createCheckpoint",
      ],
      ["a missing key", () => upload(h, good, "model", { key: null } as never), 401, "Authorization"],
      [
        "an unknown key",
        () => upload(h, good, "model", { key: "papa_not-a-real-key-at-all-xxxxxxxxxxxx" }),
        401,
        "unknown or revoked",
      ],
    ];

    it.each(cases)("%s", async (_case, send, status, detail) => {
      const before = await h.leftovers();
      const res = await send();
      expect(res.status).toBe(status);
      expect(res.headers.get("content-type")).toBe("application/problem+json");
      const problem = (await expectDocumented("createCheckpoint", res)) as Problem;
      expect(problem.status).toBe(status);
      expect(problem.detail).toContain(detail);
      expect(problem.request_id).toBe(res.headers.get("x-request-id"));
      await expectNothingLeft(before);
    });
  });

  it("isolates tenants: another tenant's checkpoint is a 404 everywhere", async () => {
    const { id } = await created(smallCheckpoint(8));
    for (const [method, path] of [
      ["GET", `/v1/checkpoints/${id}`],
      ["GET", `/v1/checkpoints/${id}/weights`],
      ["DELETE", `/v1/checkpoints/${id}`],
    ] as const) {
      const res = await h.request(path, { method, key: h.keyB });
      expect(res.status, `${method} ${path}`).toBe(404);
      expect(((await res.json()) as Problem).type).toBe("urn:papa:problem:not-found");
    }
    const listB = (await (await h.request("/v1/checkpoints", { key: h.keyB })).json()) as {
      items: unknown[];
    };
    expect(listB.items).toEqual([]);
    expect((await h.request(`/v1/checkpoints/${id}`)).status).toBe(200);
  });

  it("validates ids in paths", async () => {
    const res = await h.request("/v1/checkpoints/not-a-uuid");
    expect(res.status).toBe(400);
    const problem = (await expectDocumented("getCheckpoint", res)) as Problem;
    expect(problem.errors?.[0]).toMatchObject({ in: "path", name: "id" });
  });

  it("creates, lists and revokes API keys; a revoked key gets 401", async () => {
    const res = await h.request("/v1/api-keys", {
      method: "POST",
      body: JSON.stringify({ name: "ci" }),
      headers: { "Content-Type": "application/json" },
    });
    expect(res.status).toBe(201);
    const created = (await expectDocumented("createApiKey", res)) as {
      id: string;
      key: string;
      prefix: string;
    };
    expect(created.key.startsWith(created.prefix)).toBe(true);
    expect((await h.request("/v1/checkpoints", { key: created.key })).status).toBe(200);

    const list = (await expectDocumented("listApiKeys", await h.request("/v1/api-keys"))) as {
      items: { id: string }[];
    };
    expect(list.items.map((k) => k.id)).toContain(created.id);
    expect(JSON.stringify(list)).not.toContain(created.key);

    expect((await h.request(`/v1/api-keys/${created.id}`, { method: "DELETE", key: h.keyB })).status).toBe(
      404,
    );
    const revoked = await h.request(`/v1/api-keys/${created.id}`, { method: "DELETE", key: created.key });
    expect(revoked.status).toBe(204);
    const denied = await h.request("/v1/checkpoints", { key: created.key });
    expect(denied.status).toBe(401);
    expect(denied.headers.get("www-authenticate")).toContain("Bearer");

    const badBody = await h.request("/v1/api-keys", {
      method: "POST",
      body: JSON.stringify({ name: "", extra: 1 }),
      headers: { "Content-Type": "application/json" },
    });
    expect(badBody.status).toBe(422);
    expect(((await badBody.json()) as Problem).errors?.map((e) => e.name).sort()).toEqual(["extra", "name"]);
    const noBody = await h.request("/v1/api-keys", { method: "POST" });
    expect(noBody.status).toBe(201);
  });

  it("answers health, readiness and the OpenAPI document without a key", async () => {
    const health = await h.request("/healthz", { key: null });
    expect(await expectDocumented("getHealth", health)).toEqual({ status: "ok" });
    const ready = await h.request("/readyz", { key: null });
    expect(await expectDocumented("getReadiness", ready)).toEqual({
      status: "ready",
      database: db,
      store,
      training_backend: null,
    });
    const spec = await h.request("/openapi.yaml", { key: null });
    expect(spec.status).toBe(200);
    expect(await spec.text()).toContain("openapi: 3.1.0");
  });

  it("logs one JSON line per request with its id, and never a key", async () => {
    const res = await h.request("/v1/checkpoints", { headers: { "X-Request-Id": "trace-123" } });
    expect(res.headers.get("x-request-id")).toBe("trace-123");
    const line = h.logs.map((l) => JSON.parse(l)).find((l) => l.request_id === "trace-123");
    expect(line).toMatchObject({
      level: "info",
      msg: "request",
      method: "GET",
      path: "/v1/checkpoints",
      status: 200,
    });
    expect(line.tenant_id).toBe(h.tenantA);
    const all = h.logs.join("");
    expect(all).not.toContain(h.keyA);
    expect(all).not.toContain(h.keyB);
  });
});
