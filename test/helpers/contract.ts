import { Ajv2020 } from "ajv/dist/2020.js";
import addFormatsPlugin from "ajv-formats";
import { expect } from "vitest";
import { parse } from "yaml";
import { componentSchemas, openApiText, withComponentRefs } from "../../src/http/openapi.js";

const addFormats = addFormatsPlugin as unknown as typeof addFormatsPlugin.default;
const spec = parse(openApiText) as {
  paths: Record<string, Record<string, { operationId?: string; responses?: Record<string, ResponseSpec> }>>;
  components: { responses: Record<string, ResponseSpec> };
};
interface ResponseSpec {
  $ref?: string;
  content?: Record<string, { schema: object }>;
}

const ajv = new Ajv2020({ allErrors: true, strict: true });
addFormats(ajv);
ajv.addSchema(componentSchemas(spec as never));

function responsesOf(operationId: string): Record<string, ResponseSpec> {
  for (const item of Object.values(spec.paths)) {
    for (const op of Object.values(item)) {
      if (op.operationId === operationId) return op.responses ?? {};
    }
  }
  throw new Error(`no operation ${operationId} in openapi.yaml`);
}

/**
 * Asserts that a response is one openapi.yaml documents for the operation: the status is
 * listed, and a body is valid against the schema of its content type. Returns the parsed body.
 */
export async function expectDocumented(operationId: string, res: Response): Promise<unknown> {
  let documented = responsesOf(operationId)[String(res.status)];
  expect(documented, `${operationId} does not document status ${res.status}`).toBeDefined();
  if (documented?.$ref) documented = spec.components.responses[documented.$ref.split("/").pop() ?? ""];
  const contentType = (res.headers.get("content-type") ?? "").split(";")[0] ?? "";
  const content = documented?.content;
  if (!content) {
    expect(await res.text()).toBe("");
    return undefined;
  }
  const media = content[contentType];
  expect(media, `${operationId} ${res.status} does not document content type ${contentType}`).toBeDefined();
  if (!contentType.endsWith("json")) return res;
  const body: unknown = await res.json();
  const validate = ajv.compile(withComponentRefs(media?.schema ?? {}));
  expect(validate(body), JSON.stringify(validate.errors)).toBe(true);
  return body;
}
