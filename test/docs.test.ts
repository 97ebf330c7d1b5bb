import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { operationIds } from "../src/http/openapi.js";
import { type Harness, listen, startHarness } from "./helpers/harness.js";

describe("the API reference page", () => {
  let h: Harness;
  let server: Awaited<ReturnType<typeof listen>>;
  let base: string;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem");
    server = await listen(h);
    base = server.base;
  });
  afterAll(async () => {
    await server.close();
    await h.close();
  });

  it("is served without a key and loads nothing from elsewhere", async () => {
    const res = await h.request("/docs", { key: null });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/html");
    const page = await res.text();
    expect(page).not.toMatch(/<script|<link|src=|https?:\/\//);
  });

  it("lists every operation when headless Chromium renders it", async () => {
    const profile = await mkdtemp(join(tmpdir(), "papa-chromium-"));
    try {
      const { stdout } = await promisify(execFile)(
        "chromium",
        [
          "--headless",
          "--no-sandbox",
          "--disable-gpu",
          "--disable-quic",
          "--no-first-run",
          "--disable-background-networking",
          "--disable-component-update",
          "--disable-sync",
          `--user-data-dir=${profile}`,
          "--dump-dom",
          `${base}/docs`,
        ],
        { timeout: 60_000, maxBuffer: 16 * 1024 * 1024 },
      );
      const ids = [...stdout.matchAll(/<article id="([^"]+)" class="operation">/g)].map((m) => m[1]);
      expect(ids.sort()).toEqual([...operationIds].sort());
      expect(stdout).toContain("<h1>papa-service");
    } finally {
      await rm(profile, { recursive: true, force: true });
    }
  });
});
