import { Readable } from "node:stream";
import { eq, inArray } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { schema } from "../src/db/client.js";
import { checkpointKey } from "../src/services/checkpoints/checkpoints.js";
import { expireUploadSessions } from "../src/services/checkpoints/upload-sessions.js";
import { expectDocumented } from "./helpers/contract.js";
import { type Harness, startHarness } from "./helpers/harness.js";
import { buildSafetensors, rawSafetensors, smallCheckpoint } from "./helpers/safetensors.js";

interface Session {
  id: string;
  part_size: number;
  parts: { part_number: number; url: string }[];
}

const json = (body: object) => ({
  method: "POST",
  body: JSON.stringify(body),
  headers: { "Content-Type": "application/json" },
});

/** PUTs every slice of `file` to its presigned URL, as a client would; returns the parts to complete. */
async function sendParts(session: Session, file: Buffer) {
  return Promise.all(
    session.parts.map(async ({ part_number, url }) => {
      const slice = file.subarray((part_number - 1) * session.part_size, part_number * session.part_size);
      const res = await fetch(url, { method: "PUT", body: slice });
      expect(res.status).toBe(200);
      return { part_number, etag: res.headers.get("etag") ?? "" };
    }),
  );
}

describe("presigned upload sessions on S3 (s3rver)", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("postgres", "s3", { limits: { maxUploadBytes: 64 * 1024 * 1024 } });
  });
  afterAll(() => h.close());

  it("lists a model's versions in version order, though a session completed last has the oldest id", async () => {
    const file = smallCheckpoint(1);
    const started = await h.request(
      "/v1/upload-sessions",
      json({ name: "ordered", size_bytes: file.length }),
    );
    const session = (await started.json()) as Session;
    const direct = await h.request("/v1/checkpoints?name=ordered", {
      method: "POST",
      body: smallCheckpoint(2),
      headers: { "Content-Type": "application/octet-stream" },
    });
    expect(direct.status).toBe(201);
    const parts = await sendParts(session, file);
    expect((await h.request(`/v1/upload-sessions/${session.id}/complete`, json({ parts }))).status).toBe(201);
    type Versions = { versions: { id: string; version: number }[]; next_cursor: string | null };
    const model = (await (await h.request("/v1/models/ordered")).json()) as Versions;
    expect(model.versions.map((v) => [v.version, v.id === session.id])).toEqual([
      [2, true],
      [1, false],
    ]);
    const first = (await (await h.request("/v1/models/ordered?limit=1")).json()) as Versions;
    const second = (await (
      await h.request(`/v1/models/ordered?limit=1&cursor=${first.next_cursor}`)
    ).json()) as Versions;
    expect([...first.versions, ...second.versions].map((v) => v.version)).toEqual([2, 1]);
    const search = await h.request("/v1/checkpoints?name=ordered&sort=-version");
    expect(((await search.json()) as { items: { version: number }[] }).items.map((c) => c.version)).toEqual([
      2, 1,
    ]);
    expect((await h.request("/v1/checkpoints?sort=-version")).status).toBe(422);
  });

  it("uploads a multi-part checkpoint straight to the store, then validates and registers it", async () => {
    const values = new Float32Array(2_750_000).map((_, i) => Math.sin(i));
    const file = buildSafetensors([
      { name: "w", dtype: "F32", shape: [values.length], data: new Uint8Array(values.buffer) },
    ]);
    const res = await h.request("/v1/upload-sessions", json({ name: "big", size_bytes: file.length }));
    expect(res.status).toBe(201);
    const session = (await expectDocumented("createUploadSession", res)) as Session;
    expect(session.parts).toHaveLength(2);
    const parts = await sendParts(session, file);
    const done = await h.request(`/v1/upload-sessions/${session.id}/complete`, json({ parts }));
    expect(done.status).toBe(201);
    const checkpoint = (await expectDocumented("completeUploadSession", done)) as {
      id: string;
      size_bytes: number;
    };
    expect(checkpoint).toMatchObject({ id: session.id, size_bytes: file.length });
    const back = Buffer.from(await (await h.request(`/v1/checkpoints/${session.id}/weights`)).arrayBuffer());
    expect(back.equals(file)).toBe(true);
    const again = await h.request(`/v1/upload-sessions/${session.id}/complete`, json({ parts }));
    expect(again.status).toBe(200);
    expect(((await again.json()) as { id: string }).id).toBe(session.id);
  });

  it("completes a session exactly once when two requests race, and keeps the registered object", async () => {
    const values = new Float32Array(2_000_000).map((_, i) => Math.cos(i));
    const file = buildSafetensors([
      { name: "w", dtype: "F32", shape: [values.length], data: new Uint8Array(values.buffer) },
    ]);
    const session = (await (
      await h.request("/v1/upload-sessions", json({ name: "raced", size_bytes: file.length }))
    ).json()) as Session;
    const parts = await sendParts(session, file);
    const complete = () => h.request(`/v1/upload-sessions/${session.id}/complete`, json({ parts }));
    // Requests keep coming while the first completes: one completes; each of the others gets 409
    // while it runs and 200 after, even one that arrives as the completion commits (it got 404
    // when it looked for the checkpoint before the session).
    const answers: Response[] = [];
    const first = complete().then((r) => answers.push(r));
    let done = false;
    void first.then(() => {
      done = true;
    });
    const others: Promise<number>[] = [];
    while (!done) {
      others.push(complete().then((r) => answers.push(r)));
      await new Promise((r) => setTimeout(r, 1));
    }
    await Promise.all([first, ...others]);
    const statuses = answers.map((r) => r.status).sort();
    expect(statuses.filter((s) => s === 201)).toHaveLength(1);
    const unexpected = answers.filter((a) => ![200, 201, 409].includes(a.status));
    expect(await Promise.all(unexpected.map(async (a) => `${a.status} ${await a.clone().text()}`))).toEqual(
      [],
    );
    for (const r of answers.filter((a) => a.status !== 409)) {
      expect(((await r.json()) as { id: string }).id).toBe(session.id);
    }
    const back = await h.request(`/v1/checkpoints/${session.id}/weights`);
    expect(back.status).toBe(200);
    expect(Buffer.from(await back.arrayBuffer()).equals(file)).toBe(true);
    expect((await h.request(`/v1/upload-sessions/${session.id}`, { method: "DELETE" })).status).toBe(404);
  });

  it("refuses an invalid file after assembling it, and deletes it", async () => {
    const before = await h.leftovers();
    const file = rawSafetensors('{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}', new Uint8Array(8));
    const { id, ...session } = (await (
      await h.request("/v1/upload-sessions", json({ name: "bad", size_bytes: file.length }))
    ).json()) as Session;
    const parts = await sendParts({ id, ...session }, file);
    const res = await h.request(`/v1/upload-sessions/${id}/complete`, json({ parts }));
    expect(res.status).toBe(422);
    expect(((await res.json()) as { detail: string }).detail).toContain("needs 16");
    expect(await h.leftovers()).toEqual(before);
  });

  it("expires open sessions, and sessions whose completer died an hour past expiry, keeping registered objects", async () => {
    const file = smallCheckpoint(1);
    const start = async (name: string) =>
      (await (
        await h.request("/v1/upload-sessions", json({ name, size_bytes: file.length }))
      ).json()) as Session;
    const open = await start("open");
    const dead = await start("dead");
    const done = await start("done");
    const doneParts = await sendParts(done, file);
    expect(
      (await h.request(`/v1/upload-sessions/${done.id}/complete`, json({ parts: doneParts }))).status,
    ).toBe(201);
    // As a completer that assembled its object and died, and one that registered and died before cleaning up.
    await sendParts(dead, file);
    const deadKey = checkpointKey(h.tenantA, dead.id);
    await h.ctx.store.put(deadKey, Readable.from([file]));
    const past = new Date(Date.now() - 2 * 3600 * 1000);
    await h.ctx.db
      .update(schema.uploadSessions)
      .set({ status: "completing", expiresAt: past })
      .where(eq(schema.uploadSessions.id, dead.id));
    await h.ctx.db
      .update(schema.uploadSessions)
      .set({ expiresAt: past })
      .where(eq(schema.uploadSessions.id, open.id));
    await h.ctx.db.insert(schema.uploadSessions).values({
      id: done.id,
      tenantId: h.tenantA,
      name: "done",
      storageKey: checkpointKey(h.tenantA, done.id),
      uploadId: "gone",
      sizeBytes: file.length,
      partSize: file.length,
      status: "completing",
      expiresAt: past,
    });

    expect(await expireUploadSessions(h.ctx)).toBe(3);
    expect(await h.ctx.store.stat(deadKey)).toBeNull();
    expect(await h.ctx.store.stat(checkpointKey(h.tenantA, done.id))).not.toBeNull();
    expect(
      await h.ctx.db
        .select()
        .from(schema.uploadSessions)
        .where(inArray(schema.uploadSessions.id, [open.id, dead.id, done.id])),
    ).toEqual([]);
  });

  it("aborts a session, and refuses one over the size limit", async () => {
    const { id } = (await (
      await h.request("/v1/upload-sessions", json({ name: "x", size_bytes: 100 }))
    ).json()) as Session;
    expect((await h.request(`/v1/upload-sessions/${id}`, { method: "DELETE" })).status).toBe(204);
    expect((await h.request(`/v1/upload-sessions/${id}`, { method: "DELETE" })).status).toBe(404);
    const big = await h.request("/v1/upload-sessions", json({ name: "x", size_bytes: 2 ** 40 }));
    expect(big.status).toBe(413);
  });
});

describe("upload sessions on the filesystem store", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem");
  });
  afterAll(() => h.close());

  it("answer 409, pointing to POST /v1/checkpoints", async () => {
    const res = await h.request("/v1/upload-sessions", json({ name: "x", size_bytes: 100 }));
    expect(res.status).toBe(409);
    expect(((await res.json()) as { detail: string }).detail).toContain("POST /v1/checkpoints");
  });
});
