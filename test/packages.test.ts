import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { mergeFiles } from "../src/merge/local.js";
import { type Harness, listen, startHarness } from "./helpers/harness.js";
import { run } from "./helpers/processes.js";
import { smallCheckpoint } from "./helpers/safetensors.js";

/** npm needs its cache, under HOME. */
const HOME = { HOME: process.env.HOME ?? "" };

describe("the client package (papa-service-client)", () => {
  let h: Harness;
  let server: Awaited<ReturnType<typeof listen>>;
  let dir: string;
  let app: string;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem");
    server = await listen(h);
    dir = await mkdtemp(join(tmpdir(), "papa-package-"));
    const built = await run("npm", ["run", "-s", "pack:client", "--", "--pack-destination", dir], HOME);
    expect(built.code, built.stderr).toBe(0);
    const [tarball] = (await readdir(dir)).filter((f) => f.endsWith(".tgz"));
    app = join(dir, "app");
    await mkdir(app);
    await writeFile(
      join(app, "package.json"),
      JSON.stringify({ name: "app", private: true, type: "module" }),
    );
    const install = ["install", join(dir, tarball ?? ""), "--no-audit", "--no-fund", "--prefer-offline"];
    const installed = await run("npm", install, HOME, app);
    expect(installed.code, installed.stderr).toBe(0);
  }, 120_000);
  afterAll(async () => {
    await server.close();
    await h.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("installs alone: the client, the CLI and openapi-fetch, none of the server's dependencies", async () => {
    expect((await readdir(join(app, "node_modules"))).filter((f) => !f.startsWith("."))).toEqual([
      "openapi-fetch",
      "openapi-typescript-helpers",
      "papa-service-client",
    ]);
  });

  it("runs papa against a server, merges local files on its threads, and imports as a typed client", async () => {
    const papa = join(app, "node_modules", ".bin", "papa");
    const env = { ...HOME, PAPA_URL: server.base, PAPA_API_KEY: h.keyA };
    const [a, b, out] = ["a", "b", "soup"].map((f) => join(dir, `${f}.safetensors`)) as [
      string,
      string,
      string,
    ];
    await writeFile(a, smallCheckpoint(1));
    await writeFile(b, smallCheckpoint(2));
    const up = await run(papa, ["upload", a, "--name", "from-package"], env, dir);
    expect(up.code, up.stderr).toBe(0);
    expect(JSON.parse(up.stdout)).toMatchObject({ name: "from-package", version: 1 });

    const merged = await run(papa, ["merge", "--method", "papa-all", "--out", out, a, b], env, dir);
    expect(merged.code, merged.stderr).toBe(0);
    const reference = join(dir, "reference.safetensors");
    await mergeFiles({ inputs: [a, b], out: reference, spec: { method: "papa-all" }, threads: 1 });
    expect(await readFile(out)).toEqual(await readFile(reference));

    const admin = await run(papa, ["admin", "create-tenant", "x"], env, dir);
    expect(admin.code).toBe(1);
    expect(admin.stderr).toContain("server package");

    await writeFile(
      join(app, "main.js"),
      `import { createPapaClient, unwrap } from "papa-service-client";
const client = createPapaClient({ baseUrl: process.env.PAPA_URL, apiKey: process.env.PAPA_API_KEY });
const page = unwrap(await client.GET("/v1/checkpoints", { params: { query: { name: "from-package" } } }));
console.log(page.items.map((c) => c.name + "@" + c.version).join(","));`,
    );
    const script = await run(process.execPath, ["main.js"], env, app);
    expect(script.code, script.stderr).toBe(0);
    expect(script.stdout.trim()).toBe("from-package@1");
  });
});

describe("the server package (papa-service)", () => {
  it("packs dist (built by npm's prepare), the migrations and openapi.yaml, without tests or sources", async () => {
    const packed = await run("npm", ["pack", "--dry-run", "--json"], HOME);
    expect(packed.code, packed.stderr).toBe(0);
    const files =
      (JSON.parse(packed.stdout) as { files: { path: string }[] }[])[0]?.files.map((f) => f.path) ?? [];
    for (const needed of [
      "dist/server.js",
      "dist/worker.js",
      "dist/lambda.js",
      "dist/cli.js",
      "dist/cli/admin.js",
      "dist/client.d.ts",
      "dist/merge/worker.js",
      "openapi.yaml",
      "drizzle/meta/_journal.json",
    ]) {
      expect(files, needed).toContain(needed);
    }
    // Nor the Lambda bundle (dist/bundle/, npm run build:lambda), which the test of it builds here.
    expect(files.filter((f) => /^(src|test|bench|infra|clients|dist\/bundle)\//.test(f))).toEqual([]);
  }, 120_000);
});
