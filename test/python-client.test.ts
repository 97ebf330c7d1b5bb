import { spawn } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Harness, listen, startHarness } from "./helpers/harness.js";

/** Debian's Python, with the python3-pytest, python3-numpy and python3-torch that `.ci/run` installs. */
const PYTHON = "/usr/bin/python3";

describe("the Python client (clients/python), by pytest against a running service", () => {
  let h: Harness;
  let server: Awaited<ReturnType<typeof listen>>;
  beforeAll(async () => {
    // The example's CNN is 0.2 MB a member.
    const limits = { maxUploadBytes: 16 * 1024 * 1024, maxMergeInputBytes: 256 * 1024 * 1024 };
    h = await startHarness("postgres", "filesystem", { worker: true, limits });
    server = await listen(h);
  });
  afterAll(async () => {
    await server.close();
    await h.close();
  });

  it("passes its pytest suite, PyTorch and the example included", async () => {
    const { code, output } = await new Promise<{ code: number | null; output: string }>((resolve) => {
      const child = spawn(
        PYTHON,
        ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "clients/python/tests"],
        {
          env: {
            PATH: process.env.PATH ?? "",
            PAPA_URL: server.base,
            PAPA_API_KEY: h.keyA,
            PYTHONPATH: "clients/python",
          },
        },
      );
      let output = "";
      child.stdout.on("data", (d: Buffer) => {
        output += d.toString();
      });
      child.stderr.on("data", (d: Buffer) => {
        output += d.toString();
      });
      child.on("exit", (exit) => resolve({ code: exit, output }));
    });
    expect(code, output).toBe(0);
    expect(output).toMatch(/\b8 passed\b/);
    expect(output).not.toContain("skipped");
  }, 600_000);
});
