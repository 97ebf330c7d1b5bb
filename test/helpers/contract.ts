import { Ajv2020 } from "ajv/dist/2020.js";
import addFormatsPlugin from "ajv-formats";
import { expect } from "vitest";
import { parse } from "yaml";
import { componentSchemas, openApiText, withComponentRefs } from "../../src/http/openapi.js";

const addFormats = addFormatsPlugin as unknown as typeof addFormatsPlugin.default;
const spec = parse(openApiText) as {
  paths: Record<
    string,
    Record<
      string,
      {
        operationId?: string;
        responses?: Record<string, ResponseSpec>;
        security?: unknown[];
        requestBody?: { content: Record<string, unknown> };
      }
    >
  >;
  components: { responses: Record<string, ResponseSpec> };
};
interface ResponseSpec {
  $ref?: string;
  content?: Record<string, { schema: object }>;
}

const ajv = new Ajv2020({ allErrors: true, strict: true });
addFormats(ajv);
ajv.addSchema(componentSchemas(spec as never));

/** The operations of openapi.yaml, with what tests need to call them. */
export const operations = Object.entries(spec.paths).flatMap(([path, item]) =>
  Object.entries(item)
    .filter(([, op]) => op.operationId)
    .map(([method, op]) => ({
      method: method.toUpperCase(),
      path,
      /** Public operations say `security: []`. */
      authenticated: op.security === undefined || op.security.length > 0,
      bodyTypes: Object.keys(op.requestBody?.content ?? {}),
      pattern: new RegExp(`^${path.replace(/\{[^}]+\}/g, "[^/]+")}$`),
      operationId: op.operationId as string,
      responses: op.responses ?? {},
    })),
);

/** Every documented response, as "operationId status". */
export const documentedResponses = operations.flatMap((op) =>
  Object.keys(op.responses).map((status) => `${op.operationId} ${status}`),
);

/** The responses this test file's requests produced (see `checkResponse`), as "operationId status". */
export const observedResponses = new Set<string>();

function responsesOf(operationId: string): Record<string, ResponseSpec> {
  const op = operations.find((o) => o.operationId === operationId);
  if (!op) throw new Error(`no operation ${operationId} in openapi.yaml`);
  return op.responses;
}

/**
 * Checks a response to a request the harness made against openapi.yaml, when the request
 * names a documented operation, and records it; the response itself is left unread.
 */
export async function checkResponse(method: string, url: string, res: Response): Promise<void> {
  const path = new URL(url, "http://h").pathname;
  const op = operations.find((o) => o.method === method.toUpperCase() && o.pattern.test(path));
  if (!op) return;
  observedResponses.add(`${op.operationId} ${res.status}`);
  // An event stream does not end: its status and media type are checked, not its body.
  const streaming = res.headers.get("content-type")?.startsWith("text/event-stream");
  const checked = streaming ? new Response(null, { status: res.status, headers: res.headers }) : res.clone();
  await expectDocumented(op.operationId, checked);
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
