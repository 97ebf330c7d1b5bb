import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { type AddressInfo, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Harness, listen, startHarness, upload } from "./helpers/harness.js";
import { member, weightsOf } from "./helpers/jobs.js";
import { run } from "./helpers/processes.js";
import { buildSafetensors, smallCheckpoint } from "./helpers/safetensors.js";
import { INDEX, SHARD_1, SHARD_2, sharded } from "./helpers/sharded.js";

/** Runs `papa` as a user would, with only the given environment. */
const papa = (args: string[], env: Record<string, string>) =>
  run(process.execPath, ["--import", "tsx", "src/cli.ts", ...args], env);

describe("the papa CLI against a server", () => {
  let h: Harness;
  let server: Awaited<ReturnType<typeof listen>>;
  let dir: string;
  let env: Record<string, string>;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem", { worker: true });
    server = await listen(h);
    dir = await mkdtemp(join(tmpdir(), "papa-cli-"));
    env = {
      PAPA_URL: server.base,
      PAPA_API_KEY: h.keyA,
      HOME: dir,
    };
  });
  afterAll(async () => {
    await server.close();
    await h.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("uploads, lists, shows, downloads (sha256 verified), merges remotely and prints lineage", async () => {
    const ids: string[] = [];
    for (const k of [1, 2]) {
      const file = join(dir, `m${k}.safetensors`);
      await writeFile(file, smallCheckpoint(k));
      const up = await papa(["upload", file, "--name", `member-${k}`], env);
      expect(up.stderr).toContain("upload 100.0%");
      expect(up.code).toBe(0);
      ids.push((JSON.parse(up.stdout) as { id: string }).id);
    }
    const ls = await papa(["ls"], env);
    expect(ls.code).toBe(0);
    expect(ls.stdout).toContain("member-1");
    const show = await papa(["show", ids[0] ?? ""], env);
    expect(JSON.parse(show.stdout)).toMatchObject({ id: ids[0], name: "member-1" });

    const out = join(dir, "back.safetensors");
    const down = await papa(["download", ids[1] ?? "", "--out", out], env);
    expect(down.code).toBe(0);
    expect((await readFile(out)).equals(smallCheckpoint(2))).toBe(true);

    const merged = await papa(
      ["merge", "--remote", "--method", "papa-all", "--name", "soup", "--follow", ...ids],
      env,
    );
    expect(merged.stderr).toContain("succeeded");
    expect(merged.code).toBe(0);
    const job = JSON.parse(merged.stdout) as { status: string; result: { checkpoints: { id: string }[] } };
    expect(job.status).toBe("succeeded");
    const soup = job.result.checkpoints[0]?.id ?? "";
    const tree = await papa(["lineage", soup], env);
    expect(tree.code).toBe(0);
    expect(tree.stdout.split("\n")[0]).toContain("soup");
    expect(tree.stdout).toContain("  0.5000 x member-1");
    expect(tree.stdout).toContain("contribution 0.5000 of member-2");
    const jobs = await papa(["jobs"], env);
    expect(jobs.stdout).toContain("merge  succeeded  100%");
  });

  it("lists the registry's models and a model's versions, and points aliases at versions", async () => {
    for (const k of [1, 2]) {
      const file = join(dir, `reg${k}.safetensors`);
      await writeFile(file, smallCheckpoint(k));
      expect((await papa(["upload", file, "--name", "registry-model"], env)).code).toBe(0);
    }
    const models = await papa(["models"], env);
    expect(models.code, models.stderr).toBe(0);
    expect(models.stdout).toContain("registry-model  latest 2  2 versions\n");
    const set = await papa(["alias", "registry-model", "production", "1"], env);
    expect(set.code, set.stderr).toBe(0);
    expect(JSON.parse(set.stdout)).toMatchObject({ alias: "production", version: 1 });
    const shown = await papa(["models", "registry-model"], env);
    const lines = shown.stdout.trim().split("\n");
    expect(lines[0]).toBe("production -> 1");
    expect(lines.slice(1).map((line) => line.split("  ")[0])).toEqual(["v2", "v1"]);
    expect((await papa(["alias", "registry-model", "production", "--delete"], env)).code).toBe(0);
    expect((await papa(["models", "registry-model"], env)).stdout).not.toContain("production");
    const wrong = await papa(["alias", "registry-model", "production"], env);
    expect(wrong.code).toBe(2);
    const missing = await papa(["alias", "registry-model", "staging", "9"], env);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("9");
  });

  it("uploads a folder of shards, index and companion files as one checkpoint, and downloads it into a folder", async () => {
    const model = join(dir, "sharded-model");
    await mkdir(model);
    const files = sharded(1);
    for (const [name, bytes] of Object.entries(files)) await writeFile(join(model, name), bytes);
    await writeFile(join(model, ".DS_Store"), "hidden files stay home");
    const up = await papa(["upload", model], env);
    expect(up.code, up.stderr).toBe(0);
    const checkpoint = JSON.parse(up.stdout) as { id: string; name: string; files: { name: string }[] };
    expect(checkpoint.name).toBe("sharded-model");
    expect(checkpoint.files.map((f) => f.name).sort()).toEqual(Object.keys(files).sort());

    const back = join(dir, "back-model");
    const down = await papa(["download", checkpoint.id, "--out", back], env);
    expect(down.code, down.stderr).toBe(0);
    expect(down.stdout.trim().split("\n")).toHaveLength(5);
    for (const [name, bytes] of Object.entries(files))
      expect(await readFile(join(back, name))).toEqual(bytes);

    const two = await papa(["upload", join(model, INDEX), join(model, SHARD_1), "--name", "half"], env);
    expect(two.code).toBe(1);
    expect(two.stderr).toContain(SHARD_2); // the index names a shard that was not sent
  });

  it("runs a population: create, submit, wait for the next weights, finish", async () => {
    const created = await papa(
      ["population", "create", "--name", "cli-pop", "--size", "2", "--method", "papa-all"],
      env,
    );
    expect(created.code, created.stderr).toBe(0);
    const { id } = JSON.parse(created.stdout) as { id: string };
    for (const m of [0, 1]) {
      const file = join(dir, `p${m}.safetensors`);
      await writeFile(file, member(2 * m + 1));
      const submitted = await papa(["population", "submit", id, "0", String(m), file], env);
      expect(submitted.code, submitted.stderr).toBe(0);
      expect(JSON.parse(submitted.stdout)).toMatchObject({ round: 0, member: m });
    }
    const out = join(dir, "next.safetensors");
    const waited = await papa(["population", "wait", id, "0", "--member", "1", "--out", out], env);
    expect(waited.code, waited.stderr).toBe(0);
    expect(waited.stderr).toContain("round 0 closed");
    const next = await upload(h, await readFile(out), "next");
    expect((await weightsOf(h, ((await next.json()) as { id: string }).id)).w).toEqual([2, 4, -2, 1]);
    const late = await papa(["population", "submit", id, "0", "0", out], env);
    expect(late.code).toBe(1);
    expect(late.stderr).toContain("409");
    const finished = await papa(["population", "finish", id, "--follow"], env);
    expect(finished.code, finished.stderr).toBe(0);
    expect(JSON.parse(finished.stdout)).toHaveProperty("result.soup_checkpoint_id");
    expect(JSON.parse((await papa(["population", "show", id], env)).stdout)).toMatchObject({
      status: "finished",
    });
    expect(
      (await papa(["population", "create", "--name", "x", "--size", "two", "--method", "papa"], env)).code,
    ).toBe(2);
  });

  it("reads the config file, and fails with exit codes scripts can rely on", async () => {
    await mkdir(join(dir, ".config", "papa"), { recursive: true });
    await writeFile(
      join(dir, ".config", "papa", "config.json"),
      JSON.stringify({ url: env.PAPA_URL, api_key: h.keyA }),
    );
    expect((await papa(["ls"], { HOME: dir })).code).toBe(0);
    const missing = await papa(["show", "01a21c82-9c47-7abd-a849-4a1c03318636"], env);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("404 Not Found");
    const noKey = await papa(["ls"], { PAPA_URL: env.PAPA_URL ?? "", HOME: join(dir, "nowhere") });
    expect(noKey.code).toBe(1);
    expect(noKey.stderr).toContain("no API key");
    expect((await papa(["show"], env)).code).toBe(2);
  });

  it("says which URL it cannot reach, and which file is not there, without a stack trace", async () => {
    // A port nothing listens on: one the system just gave out and took back.
    const closed = createServer();
    await new Promise<void>((r) => closed.listen(0, "127.0.0.1", r));
    const { port } = closed.address() as AddressInfo;
    await new Promise((r) => closed.close(r));
    const down = await papa(["ls"], { ...env, PAPA_URL: `http://127.0.0.1:${port}` });
    expect(down.code).toBe(1);
    expect(down.stderr).toBe(
      `papa: cannot reach http://127.0.0.1:${port}/v1/checkpoints?limit=50: ECONNREFUSED\n`,
    );
    const missing = await papa(
      ["merge", "--method", "papa-all", "--out", join(dir, "o.safetensors"), "nope.safetensors"],
      env,
    );
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("nope.safetensors");
    expect(missing.stderr).not.toContain("    at ");
  });
});

describe("papa --help", () => {
  it("prints every command's usage, or one command's, and exits 0", async () => {
    const all = await papa(["--help"], {});
    expect(all.code).toBe(0);
    for (const command of [
      "upload",
      "ls",
      "show",
      "download",
      "merge",
      "train",
      "jobs",
      "lineage",
      "population",
      "admin",
    ]) {
      expect(all.stdout).toContain(`\n  ${command} `);
    }
    for (const command of ["merge", "population", "upload"]) {
      const one = await papa([command, "--help"], {});
      expect(one.code, command).toBe(0);
      expect(one.stdout, command).toContain(`\n  ${command} `);
      expect(
        one.stdout
          .split("\n")
          .filter((l) => /^ {2}[a-z]/.test(l))
          .every((l) => l.startsWith(`  ${command} `)),
      ).toBe(true);
    }
    expect((await papa(["help", "train"], {})).stdout).toContain("train SPEC.json");
    const wrong = await papa(["merge", "--nope"], {});
    expect(wrong.code).toBe(2);
    expect(wrong.stderr).toContain("merge --method M");
  });
});

describe("npm run papa", () => {
  it("reads the caller's relative paths, not the package directory's", async () => {
    const dir = await mkdtemp(join(tmpdir(), "papa-npm-"));
    try {
      await writeFile(join(dir, "a.safetensors"), smallCheckpoint(1));
      await writeFile(join(dir, "b.safetensors"), smallCheckpoint(2));
      const merge = [
        "merge",
        "--method",
        "papa-all",
        "--out",
        "soup.safetensors",
        "a.safetensors",
        "b.safetensors",
      ];
      const merged = await run(
        "npm",
        ["--prefix", process.cwd(), "run", "papa", "--", ...merge],
        { HOME: dir },
        dir,
      );
      expect(merged.code, merged.stderr).toBe(0);
      expect((await stat(join(dir, "soup.safetensors"))).size).toBeGreaterThan(0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("papa upload --resumable on an S3 deployment", () => {
  let h: Harness;
  let server: Awaited<ReturnType<typeof listen>>;
  let dir: string;
  beforeAll(async () => {
    h = await startHarness("postgres", "s3", { limits: { maxUploadBytes: 64 * 1024 * 1024 } });
    server = await listen(h);
    dir = await mkdtemp(join(tmpdir(), "papa-cli-s3-"));
  });
  afterAll(async () => {
    await server.close();
    await h.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("skips the parts an interrupted run finished, and registers the checkpoint", async () => {
    const values = new Float32Array(2_750_000).map((_, i) => Math.cos(i));
    const bytes = buildSafetensors([
      { name: "w", dtype: "F32", shape: [values.length], data: new Uint8Array(values.buffer) },
    ]);
    const file = join(dir, "big.safetensors");
    await writeFile(file, bytes);
    // An earlier run that created the session and sent part 1 before it died:
    const created = await h.request("/v1/upload-sessions", {
      method: "POST",
      body: JSON.stringify({ name: "big", size_bytes: bytes.length }),
      headers: { "Content-Type": "application/json" },
    });
    const session = (await created.json()) as {
      id: string;
      part_size: number;
      parts: { part_number: number; url: string }[];
    };
    const first = await fetch(session.parts[0]?.url ?? "", {
      method: "PUT",
      body: bytes.subarray(0, session.part_size),
    });
    const { mtimeMs } = await stat(file);
    await writeFile(
      `${file}.papa-upload.json`,
      JSON.stringify({ file, size: bytes.length, mtimeMs, session, etags: { 1: first.headers.get("etag") } }),
    );

    const run = await papa(["upload", file, "--resumable"], {
      PAPA_URL: server.base,
      PAPA_API_KEY: h.keyA,
      HOME: dir,
    });
    expect(run.stderr).toContain("1 of 2 parts done");
    expect(run.stderr).toContain("upload part 2 of 2");
    expect(run.stderr).not.toContain("upload part 1 of 2");
    expect(run.code).toBe(0);
    const checkpoint = JSON.parse(run.stdout) as { id: string; size_bytes: number };
    expect(checkpoint).toMatchObject({ id: session.id, size_bytes: bytes.length });
    const back = Buffer.from(await (await h.request(`/v1/checkpoints/${session.id}/weights`)).arrayBuffer());
    expect(back.equals(bytes)).toBe(true);
    await expect(stat(`${file}.papa-upload.json`)).rejects.toThrow();
  });
});
