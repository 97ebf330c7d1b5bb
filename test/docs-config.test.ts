import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { CONFIG_VARIABLES, loadConfig } from "../src/config.js";

describe("docs/configuration.md", () => {
  const doc = readFileSync(new URL("../docs/configuration.md", import.meta.url), "utf8");

  it("documents every variable the service reads", () => {
    const secrets = ["DATABASE_SECRET_ARN", "DATABASE_CA_FILE", "PAPA_API_KEY_SECRET_ARN"];
    const missing = [...CONFIG_VARIABLES, ...secrets].filter((v) => !doc.includes(`\`${v}\``));
    expect(missing).toEqual([]);
  });

  it("finds a dead worker's job within 2 minutes on the defaults", () => {
    const { worker } = loadConfig({});
    expect(worker.leaseSeconds + worker.maintenanceSeconds).toBeLessThanOrEqual(120);
  });
});
