import { Ajv2020 } from "ajv/dist/2020.js";
import addFormatsPlugin from "ajv-formats";
import { describe, expect, it } from "vitest";
import { parse } from "yaml";
import {
  compileAllValidators,
  componentSchemas,
  openApiText,
  withComponentRefs,
} from "../src/http/openapi.js";

const addFormats = addFormatsPlugin as unknown as typeof addFormatsPlugin.default;
const doc = parse(openApiText) as {
  paths: Record<string, Record<string, { operationId?: string; summary?: string; responses?: object }>>;
  components: { schemas: Record<string, { examples?: unknown[] }> };
};

/** Every schema object in the document, with where it is. */
function schemasWithExamples(
  node: unknown,
  at: string,
  out: { at: string; schema: { examples: unknown[] } }[],
) {
  if (!node || typeof node !== "object") return out;
  const record = node as Record<string, unknown>;
  if (Array.isArray(record.examples) && ("type" in record || "$ref" in record || "oneOf" in record)) {
    out.push({ at, schema: record as { examples: unknown[] } });
  }
  for (const [key, value] of Object.entries(record)) schemasWithExamples(value, `${at}/${key}`, out);
  return out;
}

/** Every `schema` object in the document (parameters, bodies, responses, headers), with where it is. */
function namedSchemas(node: unknown, at: string, out: { at: string; schema: object }[]) {
  if (!node || typeof node !== "object") return out;
  for (const [key, value] of Object.entries(node)) {
    if (key === "schema" && value && typeof value === "object")
      out.push({ at: `${at}/schema`, schema: value });
    else namedSchemas(value, `${at}/${key}`, out);
  }
  return out;
}

describe("openapi.yaml", () => {
  const operations = Object.values(doc.paths).flatMap((item) =>
    Object.entries(item).filter(([method]) => ["get", "post", "put", "delete", "patch"].includes(method)),
  );

  it("gives every operation a unique operationId, a summary and responses", () => {
    const ids = operations.map(([, op]) => op.operationId);
    expect(ids.every((id) => typeof id === "string" && /^[a-z][A-Za-z]+$/.test(id))).toBe(true);
    expect(new Set(ids).size).toBe(ids.length);
    for (const [, op] of operations) {
      expect(op.summary, op.operationId).toBeTruthy();
      expect(Object.keys(op.responses ?? {}).length, op.operationId).toBeGreaterThan(0);
    }
  });

  it("holds only schemas valid against JSON Schema 2020-12 (the service's own Ajv does not check them)", () => {
    const ajv = new Ajv2020({ strict: true });
    expect(ajv.validateSchema(componentSchemas()), JSON.stringify(ajv.errors)).toBe(true);
    const found = namedSchemas(doc, "#", []);
    expect(found.length).toBeGreaterThan(100);
    for (const { at, schema } of found)
      expect(ajv.validateSchema(withComponentRefs(schema)), `${at}: ${JSON.stringify(ajv.errors)}`).toBe(
        true,
      );
    // The check itself: a schema with a mistyped keyword value is refused.
    expect(ajv.validateSchema({ type: "object", required: "name" })).toBe(false);
  });

  it("compiles every operation's request validators in the service's strict Ajv, as a server does once it listens", async () => {
    // Without this, an operation no test calls would first meet Ajv's strict mode in production.
    await expect(compileAllValidators()).resolves.toBeUndefined();
  });

  it("has examples that are valid against their own schemas", () => {
    const ajv = new Ajv2020({ allErrors: true, strict: true });
    addFormats(ajv);
    ajv.addSchema(componentSchemas());
    const found = schemasWithExamples(doc.components.schemas, "#/components/schemas", []);
    expect(found.length).toBeGreaterThan(5);
    for (const { at, schema } of found) {
      const { examples, ...rest } = schema;
      const validate = ajv.compile(withComponentRefs(rest));
      for (const example of examples)
        expect(validate(example), `${at}: ${JSON.stringify(validate.errors)}`).toBe(true);
    }
  });
});
