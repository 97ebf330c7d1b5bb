import { join, resolve } from "node:path";
import ts from "typescript";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createPapaClient, PapaProblemError, unwrap } from "../src/client.js";
import { createLambdaHandler } from "../src/lambda.js";
import { type Harness, startHarness } from "./helpers/harness.js";
import { smallCheckpoint } from "./helpers/safetensors.js";

describe("the typed client and the Lambda entry", () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness("pglite", "filesystem");
  });
  afterAll(() => h.close());

  it("calls the API with types from openapi.yaml and surfaces problems as typed errors", async () => {
    const client = createPapaClient({
      baseUrl: "http://papa.test",
      apiKey: h.keyA,
      fetch: async (request) => h.app.request(request),
    });
    const created = unwrap(
      await client.POST("/v1/checkpoints", {
        params: { query: { name: "from-client" } },
        body: smallCheckpoint(3) as unknown as string,
        bodySerializer: (body) => body,
        headers: { "Content-Type": "application/octet-stream" },
      }),
    );
    expect(created.name).toBe("from-client");
    const page = unwrap(await client.GET("/v1/checkpoints", { params: { query: { name: "from-client" } } }));
    expect(page.items.map((c) => c.id)).toEqual([created.id]);

    const missing = await client.GET("/v1/checkpoints/{id}", {
      params: { path: { id: "01a21c82-9c47-7abd-a849-4a1c03318636" } },
    });
    const err = (() => {
      try {
        unwrap(missing);
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(PapaProblemError);
    expect((err as PapaProblemError).problem).toMatchObject({
      status: 404,
      type: "urn:papa:problem:not-found",
    });
  });

  it("serves API Gateway v2 events through the Lambda handler", async () => {
    const handler = createLambdaHandler(async () => h.ctx);
    const event = (method: string, path: string, body?: Buffer, query = "") => ({
      version: "2.0",
      routeKey: "$default",
      rawPath: path,
      rawQueryString: query,
      headers: {
        host: "abc.execute-api.eu-west-1.amazonaws.com",
        authorization: `Bearer ${h.keyA}`,
        ...(body
          ? { "content-type": "application/octet-stream", "content-length": String(body.length) }
          : {}),
      },
      requestContext: {
        accountId: "123456789012",
        apiId: "abc",
        domainName: "abc.execute-api.eu-west-1.amazonaws.com",
        domainPrefix: "abc",
        http: { method, path, protocol: "HTTP/1.1", sourceIp: "203.0.113.1", userAgent: "test" },
        requestId: "req-1",
        routeKey: "$default",
        stage: "$default",
        time: "27/Nov/2026:10:00:00 +0000",
        timeEpoch: 1795860000000,
      },
      ...(body ? { body: body.toString("base64"), isBase64Encoded: true } : { isBase64Encoded: false }),
    });
    const health = await handler(event("GET", "/healthz") as never);
    expect(health.statusCode).toBe(200);
    expect(JSON.parse(health.body)).toEqual({ status: "ok" });

    const file = smallCheckpoint(8);
    const up = await handler(event("POST", "/v1/checkpoints", file, "name=via-lambda") as never);
    expect(up.statusCode).toBe(201);
    const { id, sha256 } = JSON.parse(up.body) as { id: string; sha256: string };

    const down = await handler(event("GET", `/v1/checkpoints/${id}/weights`) as never);
    expect(down.statusCode).toBe(200);
    expect(down.isBase64Encoded).toBe(true);
    expect(Buffer.from(down.body, "base64").equals(file)).toBe(true);
    expect(down.headers?.etag).toBe(`"${sha256}"`);

    const denied = await handler({ ...event("GET", "/v1/checkpoints"), headers: { host: "x" } } as never);
    expect(denied.statusCode).toBe(401);
  });
});

describe("the types openapi-typescript generates from openapi.yaml", () => {
  /** The compiler's errors for `source`, a module beside the tests that imports the generated types. */
  function compile(source: string): string[] {
    const file = join(process.cwd(), "test", "typed-result-program.ts");
    const host = ts.createCompilerHost({});
    const read = host.readFile;
    host.readFile = (name) => (resolve(name) === file ? source : read(name));
    const exists = host.fileExists;
    host.fileExists = (name) => resolve(name) === file || exists(name);
    const program = ts.createProgram(
      [file],
      { strict: true, noEmit: true, module: ts.ModuleKind.NodeNext, target: ts.ScriptTarget.ES2022 },
      host,
    );
    return ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n"));
  }
  const header = `import type { components } from "../src/generated/openapi.js";
type Job = components["schemas"]["Job"];
`;

  it("lets a client read a training's soup accuracy once it checks the result's kind, without a cast", () => {
    expect(
      compile(`${header}
export function soups(job: Job): number[] {
  const r = job.result;
  if (r?.kind === "training") return [r.uniform_soup.accuracy, r.greedy_soup.accuracy, ...r.members.map((m) => m.held_out_accuracy)];
  if (r?.kind === "training-shard") return (r.placement.evaluation?.members ?? []).map((m) => m.accuracy);
  if (r?.kind === "merge") return r.checkpoints.map((c) => c.accuracy ?? 0);
  return [];
}
`),
    ).toEqual([]);
    // Not typed as anything goes: a merge's result has no soups.
    const errors = compile(`${header}
export const soup = (job: Job): number | undefined => job.result?.uniform_soup.accuracy;
`);
    expect(errors.join("\n")).toContain("uniform_soup");
  });
});
