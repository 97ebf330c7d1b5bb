import { execFile } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";

const run = promisify(execFile);

describe("infra", () => {
  it("has a compose file that docker-compose accepts, with the whole stack", async () => {
    await run("docker-compose", ["-f", "infra/docker-compose.yml", "config", "-q"]);
    const { stdout } = await run("docker-compose", [
      "-f",
      "infra/docker-compose.yml",
      "config",
      "--services",
    ]);
    expect(stdout.trim().split("\n").sort()).toEqual(
      ["api", "create-bucket", "merge-worker", "minio", "postgres", "train-worker"].sort(),
    );
    const { stdout: resolved } = await run("docker-compose", ["-f", "infra/docker-compose.yml", "config"]);
    expect(resolved).toContain('PAPA_IN_PROCESS_WORKER: "false"');
    expect(resolved).toContain("PAPA_WORKER_QUEUES: train");
  });

  it.each(["infra/Dockerfile", "infra/Dockerfile.gpu-worker"])(
    "%s copies only files that exist",
    (dockerfile) => {
      const text = readFileSync(dockerfile, "utf8");
      const sources = [...text.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) =>
        (m[1] ?? "").split(" "),
      );
      expect(sources.length).toBeGreaterThan(2);
      for (const source of sources) expect(existsSync(source), source).toBe(true);
    },
  );
});
