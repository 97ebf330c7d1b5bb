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

  it("is served without a key, with every asset from this origin", async () => {
    const res = await h.request("/docs", { key: null });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/html");
    const page = await res.text();
    const urls = [...page.matchAll(/(?:src|href)="([^"]+)"/g)].map((m) => m[1] ?? "");
    expect(urls.sort()).toEqual([
      "docs/assets/papa-docs.js",
      "docs/assets/swagger-ui-bundle.js",
      "docs/assets/swagger-ui.css",
    ]);
    for (const url of urls) {
      const asset = await h.request(`/${url}`, { key: null });
      expect(asset.status, url).toBe(200);
      expect(asset.headers.get("content-type")).toContain(
        url.endsWith(".css") ? "text/css" : "text/javascript",
      );
      expect((await asset.text()).length).toBeGreaterThan(url.endsWith("papa-docs.js") ? 100 : 10_000);
    }
    expect((await h.request("/docs/assets/../../package.json", { key: null })).status).not.toBe(200);
    expect((await h.request("/docs/assets/index.html", { key: null })).status).toBe(400);
  });

  it("renders every operation, with its request body's fields and try-it, in headless Chromium", async () => {
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
          // Swagger UI renders after fetching /openapi.yaml: let its timers and requests run.
          "--virtual-time-budget=10000",
          "--dump-dom",
          // A link to one operation opens it.
          `${base}/docs#/trainings/createTraining`,
        ],
        { timeout: 90_000, maxBuffer: 64 * 1024 * 1024 },
      );
      // Swagger UI's blocks are `operations-{tag}-{operationId}`, its sections `operations-tag-{tag}`.
      const blocks = [
        ...new Set([...stdout.matchAll(/id="operations-([^"]+)"/g)].map((m) => m[1] ?? "")),
      ].filter((id) => !id.startsWith("tag-"));
      const shown = (op: string) => blocks.some((id) => id.endsWith(`-${op}`));
      expect(operationIds.filter((op) => !shown(op))).toEqual([]);
      expect(blocks).toHaveLength(operationIds.length);
      // An operation's request body, opened: its fields, and the try-it button.
      const training = stdout.slice(stdout.indexOf('id="operations-trainings-createTraining"'));
      const block = training.slice(0, training.indexOf('id="operations-', 10));
      // Fields the body's example does not show: these come from its schema.
      for (const field of ["max_test_examples", "batch_size", "placement", "base_augmentation"]) {
        expect(block, field).toContain(field);
      }
      expect(block).toContain("try-out__btn");
      expect(stdout).toContain("papa-service");
    } finally {
      await rm(profile, { recursive: true, force: true });
    }
  });
});
