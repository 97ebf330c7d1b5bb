import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { run } from "./helpers/processes.js";
import { buildSafetensors, f32 } from "./helpers/safetensors.js";

const KEY = "papa_bundle-test-key-0123456789abcdef";

/**
 * Runs in a process of its own: imports the bundled handler, sends it the API Gateway v2 events
 * in `events.json` one after the other, and prints each answer's status and body. "{N}" in a
 * path or a JSON body is the id in the N-th answer.
 */
const PROBE = `
import { readFileSync } from "node:fs";
const { handler } = await import(process.env.BUNDLE);
const answers = [];
const ids = (text) => text.replace(/\\{(\\d+)\\}/g, (_, i) => JSON.parse(answers[Number(i)].body).id);
for (const event of JSON.parse(readFileSync(process.env.EVENTS, "utf8"))) {
  const { method, path, query = "", json, contentType } = event;
  const resolved = ids(path);
  const body = json === undefined ? event.body : Buffer.from(ids(json)).toString("base64");
  const reply = await handler({
    version: "2.0", routeKey: "$default", rawPath: resolved, rawQueryString: query,
    headers: { host: "bundle.test", authorization: "Bearer ${KEY}", ...(contentType ? { "content-type": contentType } : {}) },
    requestContext: { accountId: "0", apiId: "bundle", domainName: "bundle.test", domainPrefix: "bundle",
      http: { method, path: resolved, protocol: "HTTP/1.1", sourceIp: "127.0.0.1", userAgent: "test" },
      requestId: String(answers.length), routeKey: "$default", stage: "$default", time: "", timeEpoch: Date.now() },
    ...(body === undefined ? { isBase64Encoded: false } : { body, isBase64Encoded: true }),
  }, {});
  answers.push({ status: reply.statusCode, body: reply.isBase64Encoded ? "" : reply.body });
}
process.stdout.write("\\n" + JSON.stringify({ answers, tfjs: "_tfengine" in globalThis }));
process.exit(0);
`;

/** A checkpoint whose header is over 1 MiB, so that the upload parses it on the header thread. */
function manyTensors(seed: number): Buffer {
  const tensors = Array.from({ length: 12_000 }, (_, i) => ({
    name: `encoder.layers.${i}.attention.output.dense.weight`,
    dtype: "F32",
    shape: [1],
    data: f32([seed + i]),
  }));
  const file = buildSafetensors(tensors);
  expect(file.readUInt32LE(0)).toBeGreaterThan(1024 * 1024);
  return file;
}

describe("the Lambda bundle (npm run build:lambda)", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "papa-bundle-"));
    const built = await run(process.execPath, ["scripts/bundle-lambda.mjs"], {});
    expect(built.stderr).toBe("");
    expect(built.code).toBe(0);
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it("serves the API from one module, its worker threads beside it, without TF.js", async () => {
    const upload = (name: string, file: Buffer) => ({
      method: "POST",
      path: "/v1/checkpoints",
      query: `name=${name}`,
      body: file.toString("base64"),
      contentType: "application/octet-stream",
    });
    const events = [
      { method: "GET", path: "/healthz" },
      upload("wide-a", manyTensors(1)),
      upload("wide-b", manyTensors(2)),
      { method: "GET", path: "/v1/checkpoints/{1}" },
      // A merge's preflight reads the inputs' headers on the planning thread.
      {
        method: "POST",
        path: "/v1/merges",
        json: JSON.stringify({ method: "papa-all", inputs: ["{1}", "{2}"], name: "bundled-soup" }),
        contentType: "application/json",
      },
    ];
    await writeFile(join(dir, "events.json"), JSON.stringify(events));
    await writeFile(join(dir, "probe.mjs"), PROBE);
    const probe = await run(process.execPath, [join(dir, "probe.mjs")], {
      BUNDLE: join(process.cwd(), "dist/bundle/lambda.js"),
      EVENTS: join(dir, "events.json"),
      PAPA_DATA_DIR: dir,
      PAPA_API_KEY: KEY,
      PAPA_IN_PROCESS_WORKER: "false",
      PAPA_LOG_LEVEL: "error",
    });
    expect(probe.code, probe.stderr).toBe(0);
    const { answers, tfjs } = JSON.parse(probe.stdout.trim().split("\n").at(-1) ?? "") as {
      answers: { status: number; body: string }[];
      tfjs: boolean;
    };
    expect(
      answers.map((a) => a.status),
      JSON.stringify(answers),
    ).toEqual([200, 201, 201, 200, 202]);
    const [, a, , got, merged] = answers.map((x) => JSON.parse(x.body) as Record<string, unknown>);
    expect(got).toMatchObject({ id: a?.id, name: "wide-a" });
    expect(merged).toMatchObject({ kind: "merge", status: "queued" });
    expect(tfjs).toBe(false);
  });
});
