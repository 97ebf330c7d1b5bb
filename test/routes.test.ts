import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parse } from "yaml";
import { openApiText, operationIds } from "../src/http/openapi.js";
import { type Harness, startHarness } from "./helpers/harness.js";

interface Op {
  method: string;
  path: string;
  operationId: string;
  public: boolean;
}
const doc = parse(openApiText) as {
  security: unknown[];
  paths: Record<string, Record<string, { operationId: string; security?: unknown[] }>>;
};
const ops: Op[] = Object.entries(doc.paths).flatMap(([path, item]) =>
  Object.entries(item)
    .filter(([method]) => ["get", "post", "put", "delete", "patch"].includes(method))
    .map(([method, op]) => ({
      method: method.toUpperCase(),
      path: path
        .replace("{id}", "01a21c82-9c47-7abd-a849-4a1c03318636")
        .replace("{round}", "0")
        .replace("{member}", "0"),
      operationId: op.operationId,
      public: (op.security ?? doc.security).length === 0,
    })),
);

/** Checks every route of the spec shares, so a new route cannot forget one. */
describe("every operation in openapi.yaml", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("pglite", "s3"); // s3: upload sessions exist only on the S3 store
  });
  afterAll(() => h.close());

  it("is served, and nothing else is", () => {
    expect([...operationIds].sort()).toEqual(ops.map((o) => o.operationId).sort());
  });

  const secured = ops.filter((o) => !o.public);
  it.each(secured)("$operationId refuses a missing, malformed or revoked key with 401", async (op) => {
    const revoked = await h.request("/v1/api-keys", { method: "POST" });
    const { id, key } = (await revoked.json()) as { id: string; key: string };
    await h.request(`/v1/api-keys/${id}`, { method: "DELETE" });
    for (const authorization of [null, "Basic dXNlcjpwYXNz", "Bearer", `Bearer ${key}`]) {
      const headers = new Headers();
      if (authorization) headers.set("Authorization", authorization);
      const res = await h.request(op.path, { method: op.method, headers, key: null });
      expect(res.status, `${authorization}`).toBe(401);
      expect(res.headers.get("content-type")).toBe("application/problem+json");
      expect(res.headers.get("www-authenticate")).toContain("Bearer");
    }
  });

  /** Valid bodies, so that the id, not the body, is what the route rejects. */
  const bodies: Record<string, object> = {
    createCheckpointMetric: { dataset: "mnist", split: "test", name: "accuracy", value: 0.9 },
    completeUploadSession: { parts: [{ part_number: 1, etag: '"x"' }] },
    submitPopulationMember: { checkpoint_id: "01a21c82-9c47-7abd-a849-4a1c03318637" },
    updateCheckpoint: { tags: ["a"] },
  };
  it.each(secured.filter((o) => o.path.includes("01a21c82")))(
    "$operationId answers 404 problem+json for an id that is not the tenant's",
    async (op) => {
      const body = bodies[op.operationId];
      const res = await h.request(op.path, {
        method: op.method,
        ...(body ? { body: JSON.stringify(body), headers: { "Content-Type": "application/json" } } : {}),
      });
      expect(res.status).toBe(404);
      expect(((await res.json()) as { type: string }).type).toBe("urn:papa:problem:not-found");
    },
  );

  it("answers unknown routes with a problem", async () => {
    const res = await h.request("/v1/nothing-here");
    expect(res.status).toBe(404);
    expect(res.headers.get("content-type")).toBe("application/problem+json");
  });
});
