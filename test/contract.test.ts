import { randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createApiKey } from "../src/services/api-keys/api-keys.js";
import { documentedResponses, observedResponses, operations } from "./helpers/contract.js";
import { idxFiles, uploadDataset } from "./helpers/datasets.js";
import { type Harness, startHarness, upload } from "./helpers/harness.js";
import { type JobBody, postMerge, waitForJob } from "./helpers/jobs.js";
import { buildSafetensors, rawSafetensors, smallCheckpoint } from "./helpers/safetensors.js";
import { SHARD_1, sharded, uploadFiles } from "./helpers/sharded.js";

/**
 * Produces every response openapi.yaml documents, for every operation. The harness checks each
 * response against the spec (status listed, body valid) and records it; the last test fails on
 * any documented response no test here produced.
 */
describe("every documented response of every operation", () => {
  let s3: Harness; // PGlite + s3rver, with a worker: presigned URLs and upload sessions exist
  let fs: Harness; // PGlite + filesystem, no worker: jobs stay queued
  beforeAll(async () => {
    s3 = await startHarness("pglite", "s3", { worker: true, limits: { maxMergeInputBytes: 20_000 } });
    fs = await startHarness("pglite", "filesystem");
  });
  afterAll(async () => {
    await s3.close();
    await fs.close();
  });

  const json = (body: unknown, init: RequestInit = {}) => ({
    method: "POST",
    ...init,
    body: typeof body === "string" ? body : JSON.stringify(body),
    headers: { "Content-Type": "application/json", ...(init.headers as Record<string, string>) },
  });
  const expectStatus = async (res: Promise<Response>, status: number) => {
    const r = await res;
    expect(r.status, await r.clone().text()).toBe(status);
    return r;
  };
  const idOf = async (res: Promise<Response>) => ((await (await res).json()) as { id: string }).id;
  /** The path with its parameters filled in: `id`, a model's `name`, and fixed values for the rest. */
  const concrete = (path: string, id: string, name = "m") =>
    path
      .replace("{id}", id)
      .replace(/\{(round|member)\}/g, "0")
      .replace("{name}", name)
      .replace("{alias}", "production")
      .replace("{version}", "1")
      .replace("{revision}", "main")
      .replace("{filename}", "model.safetensors");
  /** Bodies valid enough to reach the resource lookup. */
  const validBodies: Record<string, unknown> = {
    createCheckpointMetric: { dataset: "mnist", split: "test", name: "accuracy", value: 0.5 },
    completeUploadSession: { parts: [{ part_number: 1, etag: "e" }] },
    submitPopulationMember: { checkpoint_id: randomUUID() },
    updateCheckpoint: { tags: ["a"] },
    setModelAlias: { version: 1 },
  };

  it("refuses requests without a key (401), with a malformed id (400), for unknown ids (404)", async () => {
    for (const op of operations.filter((o) => o.authenticated)) {
      const path = concrete(op.path, randomUUID());
      await expectStatus(s3.request(path, { method: op.method, key: null }), 401);
      if (!op.path.includes("{")) continue;
      const body = validBodies[op.operationId];
      const init = () => (body === undefined ? { method: op.method } : { ...json(body), method: op.method });
      const malformed = op.path.includes("{id}")
        ? concrete(op.path, "not-a-uuid")
        : concrete(op.path, randomUUID(), "not..a-name");
      await expectStatus(s3.request(malformed, init()), 400);
      if (op.responses["404"]) await expectStatus(s3.request(path, init()), 404);
    }
  });

  it("refuses bodies of other media types (415)", async () => {
    for (const op of operations.filter((o) => o.bodyTypes.length > 0)) {
      const path = concrete(op.path, randomUUID());
      const query = op.operationId === "createCheckpoint" ? "?name=x" : "";
      await expectStatus(
        s3.request(`${path}${query}`, {
          method: op.method,
          body: "text",
          headers: { "Content-Type": "text/plain" },
        }),
        415,
      );
    }
  });

  it("refuses requests past the API key's rate (429, Retry-After)", async () => {
    const limited = await startHarness("pglite", "filesystem", { limits: { requestsPerKeyPerMinute: 1 } });
    try {
      for (const op of operations.filter((o) => o.authenticated)) {
        const { secret } = await createApiKey({
          ctx: limited.ctx,
          principal: { tenantId: limited.tenantA },
          input: {},
        });
        await expectStatus(limited.request("/v1/api-keys", { key: secret }), 200);
        const res = await expectStatus(
          limited.request(concrete(op.path, randomUUID()), { method: op.method, key: secret }),
          429,
        );
        expect(Number(res.headers.get("retry-after"))).toBeGreaterThan(0);
      }
    } finally {
      await limited.close();
    }
  });

  it("refuses JSON bodies over the limit (413)", async () => {
    const big = JSON.stringify({ padding: "x".repeat(s3.ctx.limits.maxJsonBodyBytes) });
    for (const op of operations.filter((o) => o.bodyTypes.includes("application/json"))) {
      await expectStatus(s3.request(concrete(op.path, randomUUID()), json(big, { method: op.method })), 413);
    }
  });

  it("serves the public endpoints; readiness is 503 when the database is gone", async () => {
    for (const path of ["/healthz", "/readyz", "/docs", "/openapi.yaml", "/docs/assets/swagger-ui.css"]) {
      await expectStatus(s3.request(path, { key: null }), 200);
    }
    await expectStatus(s3.request("/docs?docExpansion=sideways", { key: null }), 400);
    await expectStatus(s3.request("/docs/assets/index.html", { key: null }), 400);
    const down = await startHarness("pglite", "filesystem");
    await down.close();
    await expectStatus(down.request("/readyz", { key: null }), 503);
  });

  it("covers checkpoints: upload, list, show, bytes, lineage, metrics, delete", async () => {
    await expectStatus(upload(s3, Buffer.alloc(70 * 1024)), 413);
    await expectStatus(upload(s3, rawSafetensors('{"w": nope}')), 422);
    await expectStatus(
      s3.request("/v1/checkpoints", {
        method: "POST",
        body: smallCheckpoint(),
        headers: { "Content-Type": "application/octet-stream" },
      }),
      400, // no name
    );
    const id = await idOf(expectStatus(upload(s3, smallCheckpoint(1), "a"), 201));
    await expectStatus(s3.request("/v1/checkpoints"), 200);
    await expectStatus(s3.request("/v1/checkpoints?limit=0"), 400);
    await expectStatus(s3.request("/v1/checkpoints?cursor=bm90LWFuLWlk"), 422);
    await expectStatus(s3.request(`/v1/checkpoints/${id}`), 200);

    const weights = `/v1/checkpoints/${id}/weights`;
    const etag = (await expectStatus(s3.request(weights), 200)).headers.get("etag") ?? "";
    await expectStatus(s3.request(weights, { headers: { Range: "bytes=0-7" } }), 206);
    await expectStatus(s3.request(weights, { headers: { Range: "bytes=100000-" } }), 416);
    await expectStatus(s3.request(weights, { headers: { "If-None-Match": etag } }), 304);
    await expectStatus(s3.request(`${weights}?redirect=true`), 302);
    await expectStatus(s3.request(`${weights}?redirect=maybe`), 400);

    const shards = await idOf(expectStatus(uploadFiles(s3, sharded(1), "shards"), 201));
    const shard = `/v1/checkpoints/${shards}/files/${SHARD_1}`;
    const shardTag = (await expectStatus(s3.request(shard), 200)).headers.get("etag") ?? "";
    await expectStatus(s3.request(shard, { headers: { Range: "bytes=0-7" } }), 206);
    await expectStatus(s3.request(shard, { headers: { Range: "bytes=100000-" } }), 416);
    await expectStatus(s3.request(shard, { headers: { "If-None-Match": shardTag } }), 304);
    await expectStatus(s3.request(`${shard}?redirect=true`), 302);
    await expectStatus(s3.request(`/v1/checkpoints/${shards}/files/nothing.json`), 404);
    await expectStatus(s3.request(`/v1/checkpoints/${shards}/weights`), 404);
    await expectStatus(s3.request(`/v1/checkpoints/${shards}`, { method: "DELETE" }), 204);
    await expectStatus(s3.request(shard), 410);

    await expectStatus(s3.request(`/v1/checkpoints/${id}/lineage`), 200);
    await expectStatus(s3.request(`/v1/checkpoints/${id}/lineage?depth=-1`), 400);
    await expectStatus(
      s3.request(`/v1/checkpoints/${id}/metrics`, json(validBodies.createCheckpointMetric)),
      201,
    );
    await expectStatus(s3.request(`/v1/checkpoints/${id}/metrics`, json({ value: "high" })), 422);
    await expectStatus(s3.request(`/v1/checkpoints/${id}/metrics`), 200);
    const patch = (body: unknown) =>
      s3.request(
        `/v1/checkpoints/${id}`,
        json(body, { method: "PATCH", headers: { "Content-Type": "application/merge-patch+json" } }),
      );
    await expectStatus(patch({ tags: ["best"], description: "the first" }), 200);
    await expectStatus(patch({ tags: ["no spaces"] }), 422);
    await expectStatus(patch("{"), 400);
    await expectStatus(s3.request("/v1/checkpoints?sort=-metric"), 422);
    await expectStatus(s3.request(`/v1/checkpoints/${id}`, { method: "DELETE" }), 204);
    await expectStatus(s3.request(weights), 410);
  });

  it("covers merges: created, replayed, conflicting, too large, invalid, malformed", async () => {
    const a = await idOf(upload(s3, smallCheckpoint(1), "a"));
    const b = await idOf(upload(s3, smallCheckpoint(2), "b"));
    const body = { method: "papa-all", inputs: [a, b], name: "soup" };
    const created = await expectStatus(postMerge(s3, body, { "Idempotency-Key": "k1" }), 202);
    await expectStatus(postMerge(s3, body, { "Idempotency-Key": "k1" }), 200);
    await expectStatus(postMerge(s3, { ...body, name: "other" }, { "Idempotency-Key": "k1" }), 409);
    const values = new Uint8Array(new Float32Array(6000).buffer);
    const big = await idOf(
      upload(s3, buildSafetensors([{ name: "w", dtype: "F32", shape: [6000], data: values }])),
    );
    await expectStatus(postMerge(s3, { ...body, inputs: [a, big] }), 413);
    await expectStatus(postMerge(s3, { ...body, method: "median" }), 422);
    await expectStatus(s3.request("/v1/merges", json("{")), 400);

    const job = await waitForJob(s3, ((await created.json()) as JobBody).id);
    expect(job.status).toBe("succeeded");
    await expectStatus(s3.request(`/v1/jobs/${job.id}`), 200);
    const events = await expectStatus(s3.request(`/v1/jobs/${job.id}/events`), 200);
    await events.body?.cancel();
    await expectStatus(s3.request(`/v1/jobs/${job.id}/cancel`, { method: "POST" }), 409);
    await expectStatus(s3.request("/v1/jobs?kind=merge"), 200);
    await expectStatus(s3.request("/v1/jobs?status=sleeping"), 400);
    await expectStatus(s3.request("/v1/jobs?cursor=bm90LWFuLWlk"), 422);

    const inputs = [await idOf(upload(fs, smallCheckpoint(1))), await idOf(upload(fs, smallCheckpoint(2)))];
    const queued = await idOf(expectStatus(postMerge(fs, { method: "papa-all", inputs }), 202));
    await expectStatus(fs.request(`/v1/jobs/${queued}/cancel`, { method: "POST" }), 200);
  });

  it("covers trainings and TF.js models", async () => {
    const spec = {
      dataset: "mnist",
      max_train_examples: 64,
      max_test_examples: 32,
      model: { kind: "mlp", hidden: [8] },
      population: { size: 2, variant: "papa", every_k_steps: 2 },
      epochs: 1,
      batch_size: 32,
    };
    const created = await expectStatus(
      s3.request("/v1/trainings", json(spec, { headers: { "Idempotency-Key": "t1" } })),
      202,
    );
    await expectStatus(
      s3.request("/v1/trainings", json(spec, { headers: { "Idempotency-Key": "t1" } })),
      200,
    );
    await expectStatus(
      s3.request("/v1/trainings", json({ ...spec, epochs: 2 }, { headers: { "Idempotency-Key": "t1" } })),
      409,
    );
    await expectStatus(s3.request("/v1/trainings", json({ ...spec, dataset: "imagenet" })), 422);
    await expectStatus(s3.request("/v1/trainings", json("[")), 400);

    const job = await waitForJob(s3, ((await created.json()) as JobBody).id, 120_000);
    expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
    const member = job.result?.checkpoints[0]?.id ?? "";
    await expectStatus(s3.request(`/v1/checkpoints/${member}/tfjs/model.json`), 200);
    const tfjs = await expectStatus(s3.request(`/v1/checkpoints/${member}/tfjs/weights.bin`), 200);
    const tfjsTag = tfjs.headers.get("etag") ?? "";
    expect(tfjsTag).not.toBe(`"${job.result?.checkpoints[0]?.sha256}"`);
    await expectStatus(
      s3.request(`/v1/checkpoints/${member}/tfjs/weights.bin`, { headers: { "If-None-Match": tfjsTag } }),
      304,
    );
    await expectStatus(s3.request(`/v1/checkpoints/${member}`, { method: "DELETE" }), 204);
    await expectStatus(s3.request(`/v1/checkpoints/${member}/tfjs/model.json`), 410);
    await expectStatus(s3.request(`/v1/checkpoints/${member}/tfjs/weights.bin`), 410);
  });

  it("covers upload sessions on S3, and their refusal on the filesystem store", async () => {
    const file = smallCheckpoint(3);
    const create = (h: Harness, body: object) => h.request("/v1/upload-sessions", json(body));
    await expectStatus(create(s3, { name: "big", size_bytes: 1024 ** 4 }), 413);
    await expectStatus(create(s3, { name: "big", size_bytes: -1 }), 422);
    await expectStatus(create(fs, { name: "big", size_bytes: file.length }), 409);
    await expectStatus(fs.request(`/v1/upload-sessions/${randomUUID()}`, { method: "DELETE" }), 409);
    await expectStatus(
      fs.request(`/v1/upload-sessions/${randomUUID()}/complete`, json(validBodies.completeUploadSession)),
      409,
    );

    const aborted = await idOf(expectStatus(create(s3, { name: "a", size_bytes: file.length }), 201));
    await expectStatus(s3.request(`/v1/upload-sessions/${aborted}`, { method: "DELETE" }), 204);

    const res = await create(s3, { name: "s", size_bytes: file.length });
    const session = (await res.json()) as { id: string; parts: { url: string }[] };
    const complete = `/v1/upload-sessions/${session.id}/complete`;
    await expectStatus(s3.request(complete, json({ parts: [] })), 422);
    const put = await fetch(session.parts[0]?.url ?? "", { method: "PUT", body: file });
    const parts = [{ part_number: 1, etag: put.headers.get("etag") ?? "" }];
    await expectStatus(s3.request(complete, json("{")), 400);
    await expectStatus(s3.request(complete, json({ parts })), 201);
    await expectStatus(s3.request(complete, json({ parts })), 200);
  });

  it("covers datasets", async () => {
    await expectStatus(uploadDataset(s3, "name=d&format=idx", idxFiles()), 201);
    const id = await idOf(uploadDataset(s3, "name=e&format=idx", idxFiles()));
    await expectStatus(uploadDataset(s3, "name=d&format=jpeg", idxFiles()), 400);
    await expectStatus(uploadDataset(s3, "name=d&format=idx", { train_images: [Buffer.from("x")] }), 422);
    const huge = { ...idxFiles(), train_images: [Buffer.alloc(5 * 1024 * 1024)] };
    await expectStatus(uploadDataset(s3, "name=d&format=idx", huge), 413);
    await expectStatus(s3.request("/v1/datasets"), 200);
    await expectStatus(s3.request("/v1/datasets?limit=x"), 400);
    await expectStatus(s3.request("/v1/datasets?cursor=bm90LWFuLWlk"), 422);
    await expectStatus(s3.request(`/v1/datasets/${id}`), 200);
    await expectStatus(s3.request(`/v1/datasets/${id}`, { method: "DELETE" }), 204);
  });

  it("covers populations: rounds, submissions, next weights, events, finish", async () => {
    await expectStatus(s3.request("/v1/populations", json({ name: "p", size: 1, method: "papa-all" })), 422);
    await expectStatus(s3.request("/v1/populations", json("{")), 400);
    const unknown = { name: "p", size: 2, method: "papa-all", initial_checkpoint_id: randomUUID() };
    await expectStatus(s3.request("/v1/populations", json(unknown)), 404);
    const id = await idOf(
      expectStatus(s3.request("/v1/populations", json({ name: "p", size: 2, method: "papa-all" })), 201),
    );
    await expectStatus(s3.request("/v1/populations"), 200);
    await expectStatus(s3.request("/v1/populations?limit=0"), 400);
    await expectStatus(s3.request("/v1/populations?cursor=bm90LWFuLWlk"), 422);
    await expectStatus(s3.request(`/v1/populations/${id}`), 200);
    await expectStatus(s3.request(`/v1/populations/${id}/finish`, { method: "POST" }), 409);
    const member = (m: number, body: Buffer) =>
      s3.request(`/v1/populations/${id}/rounds/0/members/${m}`, {
        method: "PUT",
        body,
        headers: { "Content-Type": "application/octet-stream" },
      });
    await expectStatus(member(0, Buffer.alloc(70 * 1024)), 413);
    await expectStatus(member(0, rawSafetensors('{"w": nope}')), 422);
    await expectStatus(member(0, smallCheckpoint(1)), 201);
    await expectStatus(member(0, smallCheckpoint(1)), 200);
    await expectStatus(member(0, smallCheckpoint(2)), 409);
    await expectStatus(s3.request(`/v1/populations/${id}/rounds/0/members/0/weights`), 409);
    await expectStatus(s3.request(`/v1/populations/${id}/rounds/0/members/2/weights`), 422);
    await expectStatus(s3.request(`/v1/populations/${id}/rounds/1`), 404);
    await expectStatus(member(1, smallCheckpoint(2)), 201);
    await expectStatus(s3.request(`/v1/populations/${id}/rounds/0?wait=20`), 200);
    await expectStatus(s3.request(`/v1/populations/${id}/rounds/0/members/1/weights`), 302);
    // An open population's stream does not end: its status, not its text.
    const events = await s3.request(`/v1/populations/${id}/events`);
    expect(events.status).toBe(200);
    await events.body?.cancel();
    await expectStatus(s3.request(`/v1/populations/${id}/finish`, { method: "POST" }), 202);
    await expectStatus(s3.request(`/v1/populations/${id}/finish`, { method: "POST" }), 200);
  });

  it("covers models: list, show, aliases, files", async () => {
    const a = await idOf(expectStatus(upload(s3, smallCheckpoint(1), "registry"), 201));
    await expectStatus(s3.request("/v1/models?name_prefix=reg"), 200);
    await expectStatus(s3.request("/v1/models?limit=0"), 400);
    await expectStatus(s3.request("/v1/models?cursor=bm90LWFuLWlk"), 422);
    await expectStatus(s3.request("/v1/models/registry"), 200);
    await expectStatus(s3.request("/v1/models/registry?cursor=bm90LWFuLWlk"), 422);
    const alias = (name: string, body: unknown, method = "PUT") =>
      s3.request(`/v1/models/registry/aliases/${name}`, json(body, { method }));
    await expectStatus(alias("production", { version: 1 }), 200);
    await expectStatus(alias("production", { version: 9 }), 422);
    await expectStatus(alias("latest", { version: 1 }), 422);
    await expectStatus(alias("production", "{"), 400);
    await expectStatus(s3.request("/v1/models/registry/aliases/latest", { method: "DELETE" }), 422);
    await expectStatus(s3.request("/v1/models/registry/aliases/production", { method: "DELETE" }), 204);

    await expectStatus(s3.request("/hf/api/models/registry?blobs=true"), 200);
    await expectStatus(s3.request("/hf/api/models/registry/revision/1"), 200);
    await expectStatus(s3.request("/hf/api/models/registry/revision/2"), 404);
    await expectStatus(s3.request("/hf/registry/resolve/main/model.safetensors"), 302);

    for (const file of [
      "/v1/models/registry/versions/latest/files/model.safetensors",
      "/hf/registry/resolve/main/model.safetensors",
    ]) {
      const from = file.startsWith("/hf") ? fs : s3; // the filesystem store serves the bytes itself
      if (from === fs) await expectStatus(upload(fs, smallCheckpoint(1), "registry"), 201);
      const etag = (await expectStatus(from.request(file), 200)).headers.get("etag") ?? "";
      await expectStatus(from.request(file, { headers: { Range: "bytes=0-7" } }), 206);
      await expectStatus(from.request(file, { headers: { Range: "bytes=100000-" } }), 416);
      await expectStatus(from.request(file, { headers: { "If-None-Match": etag } }), 304);
    }
    await expectStatus(
      s3.request("/v1/models/registry/versions/latest/files/model.safetensors?redirect=true"),
      302,
    );
    await expectStatus(s3.request(`/v1/checkpoints/${a}`, { method: "DELETE" }), 204);
    await expectStatus(s3.request("/v1/models/registry/versions/1/files/model.safetensors"), 410);
    await expectStatus(s3.request("/hf/registry/resolve/1/model.safetensors"), 410);
  });

  it("covers API keys", async () => {
    const id = await idOf(expectStatus(s3.request("/v1/api-keys", json({ name: "ci" })), 201));
    await expectStatus(s3.request("/v1/api-keys", json("{")), 400);
    await expectStatus(s3.request("/v1/api-keys", json({ name: "" })), 422);
    await expectStatus(s3.request("/v1/api-keys"), 200);
    await expectStatus(s3.request(`/v1/api-keys/${id}`, { method: "DELETE" }), 204);
    const onlyKey = (await (await s3.request("/v1/api-keys", { key: s3.keyB })).json()) as {
      items: { id: string }[];
    };
    const last = `/v1/api-keys/${onlyKey.items[0]?.id}`;
    await expectStatus(s3.request(last, { method: "DELETE", key: s3.keyB }), 409);
  });

  it("produced every documented response", () => {
    const missing = documentedResponses.filter((r) => !observedResponses.has(r));
    expect(missing).toEqual([]);
  });
});
