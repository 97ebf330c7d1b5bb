import { spawn } from "node:child_process";
import { once } from "node:events";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { Readable } from "node:stream";
import { text } from "node:stream/consumers";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ObjectNotFoundError } from "../src/storage/object-store.js";
import { type StoreKind, type TestResource, type TestStore, testStore } from "./helpers/backends.js";

async function bytesOf(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** A stream that yields `good` bytes and then fails, like a client that disconnects. */
function failingStream(good: Buffer): Readable {
  return Readable.from(
    (async function* () {
      yield good;
      await new Promise((r) => setTimeout(r, 10));
      throw new Error("client went away");
    })(),
  );
}

describe.each<StoreKind>(["filesystem", "s3"])("ObjectStore contract: %s", (kind) => {
  let resource: TestResource<TestStore>;
  beforeAll(async () => {
    resource = await testStore(kind);
  });
  afterAll(() => resource.close());

  it("puts, stats, gets whole and by range, lists and deletes", async () => {
    const { store } = resource.value;
    const bytes = Buffer.from("0123456789abcdef");
    expect(await store.put("a/b/one.bin", Readable.from([bytes.subarray(0, 5), bytes.subarray(5)]))).toEqual({
      sizeBytes: 16,
    });
    await store.put("a/two.bin", Readable.from([Buffer.from("x")]));
    expect(await store.stat("a/b/one.bin")).toEqual({ sizeBytes: 16 });
    expect(await store.stat("a/missing.bin")).toBeNull();
    expect((await bytesOf(await store.get("a/b/one.bin"))).toString()).toBe("0123456789abcdef");
    expect(await text(await store.get("a/b/one.bin", { start: 3, end: 7 }))).toBe("3456");
    expect(await text(await store.get("a/b/one.bin", { start: 15, end: 16 }))).toBe("f");
    expect(await store.list("a/")).toEqual(["a/b/one.bin", "a/two.bin"]);
    expect(await store.list("a/b/")).toEqual(["a/b/one.bin"]);
    await store.delete("a/b/one.bin");
    await store.delete("a/b/one.bin");
    expect(await store.list("a/")).toEqual(["a/two.bin"]);
    await expect(store.get("a/b/one.bin")).rejects.toBeInstanceOf(ObjectNotFoundError);
    await store.delete("a/two.bin");
  });

  it("overwrites a key atomically", async () => {
    const { store } = resource.value;
    await store.put("k.bin", Readable.from([Buffer.from("first")]));
    await store.put("k.bin", Readable.from([Buffer.from("second")]));
    expect(await text(await store.get("k.bin"))).toBe("second");
    await store.delete("k.bin");
  });

  it.each([
    ["a small body", 1024],
    ["a body past the first multipart part", 7 * 1024 * 1024],
  ])("leaves nothing behind when %s fails midway", async (_case, goodBytes) => {
    const { store, everything } = resource.value;
    await expect(store.put("fail/x.bin", failingStream(Buffer.alloc(goodBytes, 1)))).rejects.toThrow(
      "client went away",
    );
    expect(await store.stat("fail/x.bin")).toBeNull();
    expect(await everything()).toEqual([]);
  });

  it("streams a multi-part object of several MiB intact", async () => {
    const { store } = resource.value;
    const big = Buffer.alloc(12 * 1024 * 1024);
    for (let i = 0; i < big.length; i += 4) big.writeUInt32LE(i, i);
    const chunks = [];
    for (let i = 0; i < big.length; i += 1 << 20) chunks.push(big.subarray(i, i + (1 << 20)));
    expect(await store.put("big.bin", Readable.from(chunks))).toEqual({ sizeBytes: big.length });
    expect((await bytesOf(await store.get("big.bin"))).equals(big)).toBe(true);
    const slice = await bytesOf(await store.get("big.bin", { start: 6_000_000, end: 6_000_016 }));
    expect(slice.equals(big.subarray(6_000_000, 6_000_016))).toBe(true);
    await store.delete("big.bin");
  });

  it("writes an object from buffers reused between writes, visible only once committed", async () => {
    const { store } = resource.value;
    // Past the S3 store's 5 MiB parts, so that parts are sent while writes go on.
    const expected = Buffer.alloc(13 * 1024 * 1024);
    const scratch = new Uint8Array(1024 * 1024);
    const writer = await store.create("w/one.bin");
    for (let i = 0; i < 13; i++) {
      scratch.fill(i + 1);
      expected.fill(i + 1, i * scratch.length, (i + 1) * scratch.length);
      await writer.write(scratch);
    }
    expect(await store.stat("w/one.bin")).toBeNull();
    expect(await writer.commit()).toEqual({ sizeBytes: expected.length });
    expect((await bytesOf(await store.get("w/one.bin"))).equals(expected)).toBe(true);
    await store.delete("w/one.bin");
  });

  it("leaves nothing behind when a write is aborted, before or after its first part", async () => {
    const { store, everything } = resource.value;
    for (const bytes of [10, 6 * 1024 * 1024]) {
      const writer = await store.create("w/aborted.bin");
      await writer.write(Buffer.alloc(bytes, 7));
      await writer.abort();
      expect(await store.stat("w/aborted.bin")).toBeNull();
      expect(await everything()).toEqual([]);
    }
  });

  it("reads a range into a buffer, and refuses one past the end or of a missing object", async () => {
    const { store } = resource.value;
    await store.put("r.bin", Readable.from([Buffer.from("0123456789")]));
    const target = new Uint8Array(4);
    await store.read("r.bin", 3, target);
    expect(Buffer.from(target).toString()).toBe("3456");
    await expect(store.read("r.bin", 8, new Uint8Array(4))).rejects.toThrow("ends before byte 12");
    await expect(store.read("missing.bin", 0, new Uint8Array(1))).rejects.toBeInstanceOf(ObjectNotFoundError);
    await store.delete("r.bin");
  });

  it("refuses keys that could escape the store", async () => {
    const { store } = resource.value;
    for (const key of ["../x", "/abs", "a//b", "a/./b", ""]) {
      await expect(store.put(key, Readable.from([Buffer.from("x")]))).rejects.toThrow("invalid object key");
    }
  });

  it("presigns GET URLs where the store can", async () => {
    const { store } = resource.value;
    await store.put("p.bin", Readable.from([Buffer.from("presigned")]));
    const url = await store.presignGet("p.bin", { expiresInSeconds: 60, fileName: "p.safetensors" });
    if (kind === "filesystem") {
      expect(url).toBeNull();
    } else {
      const res = await fetch(url ?? "");
      expect(res.status).toBe(200);
      expect(await res.text()).toBe("presigned");
    }
    await store.delete("p.bin");
  });

  it("sweeps what dead writers left, and only what is old enough", async () => {
    const { store } = resource.value;
    if (kind === "s3") {
      // A writer killed mid-upload leaves an open multipart upload (with its parts) and its marker.
      const writer = spawn(process.execPath, ["--import", "tsx", "test/helpers/endless-put.ts"], {
        env: { PATH: process.env.PATH ?? "", S3_ENDPOINT: resource.value.endpoint ?? "", KEY: "dead/x.bin" },
        stdio: "ignore",
      });
      let markers: string[] = [];
      while (markers.length === 0) {
        await new Promise((r) => setTimeout(r, 50));
        markers = await store.list("_writes/");
      }
      await new Promise((r) => setTimeout(r, 500)); // a part or two more
      writer.kill("SIGKILL");
      await once(writer, "exit");
      const { key, uploadId } = JSON.parse(await text(await store.get(markers[0] ?? ""))) as {
        key: string;
        uploadId: string;
      };
      expect(key).toBe("dead/x.bin");
      expect(await store.sweepIncomplete(3600)).toBe(0); // its marker is fresh
      expect(await store.sweepIncomplete(0)).toBe(1);
      expect(uploadId).not.toBe("");
      // The marker is gone and no object was made. (s3rver does not implement
      // AbortMultipartUpload, so what the abort does to the parts is S3's to show.)
      expect(await resource.value.everything()).toEqual([]);
      return;
    }
    const { mkdir, writeFile, utimes, readdir } = await import("node:fs/promises");
    const root = resource.value.dir ?? "";
    await mkdir(`${root}/.tmp`, { recursive: true });
    await writeFile(`${root}/.tmp/old`, "x");
    await writeFile(`${root}/.tmp/fresh`, "y");
    const dayAgo = new Date(Date.now() - 2 * 24 * 3600 * 1000);
    await utimes(`${root}/.tmp/old`, dayAgo, dayAgo);
    expect(await store.sweepIncomplete(24 * 3600)).toBe(1);
    expect(await readdir(`${root}/.tmp`)).toEqual(["fresh"]);
    await rm(`${root}/.tmp/fresh`);
  });

  it("answers ping", async () => {
    await expect(resource.value.store.ping()).resolves.toBeUndefined();
  });
});

describe("the filesystem store", () => {
  it("lists a prefix by walking its directory only, not the whole store", async () => {
    const resource = await testStore("filesystem");
    const { store, dir = "" } = resource.value;
    try {
      const one = () => Readable.from([Buffer.from("x")]);
      await store.put("tenants/a/jobs/j/out.bin", one());
      await store.put("tenants/a/checkpoints/c.bin", one());
      // Elsewhere in the store, a tree deeper than a path may name (PATH_MAX, 4096): a walk into
      // it fails, so only a list that stays out of it succeeds. Made by relative steps in a shell.
      const step = "d".repeat(200);
      const made = spawn("bash", [
        "-c",
        `cd "$0" && mkdir -p tenants/b && cd tenants/b && for i in $(seq 1 25); do mkdir ${step} && cd ${step}; done && echo x > leaf.bin`,
        dir,
      ]);
      expect((await once(made, "exit"))[0]).toBe(0);
      await expect(store.list("")).rejects.toThrow(/ENAMETOOLONG/);

      expect(await store.list("tenants/a/jobs/j/")).toEqual(["tenants/a/jobs/j/out.bin"]);
      expect(await store.list("tenants/a/jo")).toEqual(["tenants/a/jobs/j/out.bin"]);
      expect(await store.list("tenants/a/")).toEqual([
        "tenants/a/checkpoints/c.bin",
        "tenants/a/jobs/j/out.bin",
      ]);
      expect(await store.list("tenants/c/")).toEqual([]);
    } finally {
      // GNU rm walks a tree of any depth (relative to each directory); fs.rm cannot.
      await once(spawn("rm", ["-rf", join(dir, "tenants")]), "exit");
      await resource.close();
    }
  });
});
