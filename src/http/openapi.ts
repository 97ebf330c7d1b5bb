import { readFileSync } from "node:fs";
import { Ajv2020, type ErrorObject, type ValidateFunction } from "ajv/dist/2020.js";
import addFormatsPlugin from "ajv-formats";
import type { Context, Hono, MiddlewareHandler } from "hono";
import { bodyLimit } from "hono/body-limit";
import type { operations } from "../generated/openapi.js";
import { OPENAPI_DOCUMENT } from "../generated/openapi-document.js";
import { PayloadTooLargeError } from "../services/errors.js";
import { authenticate } from "./auth.js";
import type { AppEnv } from "./env.js";
import { hasRequestBody } from "./incoming.js";
import { HttpProblem, type RequestMismatch } from "./problems.js";

/** openapi.yaml, the contract: routes, auth and request validation all derive from it. */
const COMPONENTS_ID = "openapi.yaml";

export const openApiText = readFileSync(new URL("../../openapi.yaml", import.meta.url), "utf8");

interface Parameter {
  name: string;
  in: "path" | "query" | "header";
  required?: boolean;
  schema: object;
}
interface Operation {
  operationId: string;
  parameters?: Array<Parameter | { $ref: string }>;
  requestBody?: { required?: boolean; content: Record<string, { schema?: object }> };
  security?: unknown[];
}
interface Document {
  components: { parameters: Record<string, Parameter>; schemas?: object };
  paths: Record<string, Record<string, Operation> & { parameters?: Operation["parameters"] }>;
  security?: unknown[];
}

// ajv-formats is CommonJS; under NodeNext its default export is the module object.
const addFormats = addFormatsPlugin as unknown as typeof addFormatsPlugin.default;
const document = OPENAPI_DOCUMENT as Document;
// "array": a query parameter given once still satisfies an array schema. The schemas are not
// checked against JSON Schema's meta-schema here (compiling it took 100 ms of every cold start):
// test/spec.test.ts checks every one of them, with Ajv's defaults.
const ajv = new Ajv2020({
  allErrors: true,
  coerceTypes: "array",
  useDefaults: true,
  strict: true,
  validateSchema: false,
});
addFormats(ajv);
ajv.addSchema(componentSchemas(document), COMPONENTS_ID);

/**
 * The document's component schemas as one JSON Schema (2020-12) with `$defs`, so Ajv can
 * resolve `$ref`s; tests validate responses with the same schemas.
 */
export function componentSchemas(doc: { components: { schemas?: object } } = document): object {
  return { $id: COMPONENTS_ID, $defs: withComponentRefs(doc.components.schemas ?? {}) };
}

const METHODS = ["get", "put", "post", "delete", "patch", "head", "options"] as const;

export type OperationId = keyof operations;
type Parameters<K extends OperationId> = operations[K]["parameters"];
type JsonBody<K extends OperationId> = operations[K] extends {
  requestBody: { content: { "application/json": infer B } };
}
  ? B
  : operations[K] extends { requestBody?: { content: { "application/json": infer B } } }
    ? B | undefined
    : undefined;

/** A request after validation: coerced parameters with defaults applied, and the parsed JSON body. */
export interface ValidRequest<K extends OperationId> {
  path: Parameters<K>["path"];
  query: Parameters<K>["query"];
  body: JsonBody<K>;
}

/** An operation's request validators (Ajv's compiled functions). */
interface Validators {
  path: ValidateFunction;
  query: ValidateFunction;
  header: ValidateFunction;
  json: ValidateFunction | null;
}

interface CompiledOperation {
  method: string;
  honoPath: string;
  public: boolean;
  mediaTypes: string[];
  bodyRequired: boolean;
  headerNames: string[];
  /** Compiled at the operation's first request, not at start: a cold start compiles none. */
  validators: () => Validators;
}

function resolveParameter(p: Parameter | { $ref: string }): Parameter {
  if (!("$ref" in p)) return p;
  const name = p.$ref.replace("#/components/parameters/", "");
  const resolved = document.components.parameters[name];
  if (!resolved) throw new Error(`openapi.yaml: unresolved ${p.$ref}`);
  return resolved;
}

/** `$ref`s inside parameter schemas point into the component schemas registered with Ajv. */
export function withComponentRefs(schema: object): object {
  return JSON.parse(
    JSON.stringify(schema).replaceAll('"$ref":"#/components/schemas/', `"$ref":"${COMPONENTS_ID}#/$defs/`),
  );
}

function compileParameters(
  params: Parameter[],
  location: Parameter["in"],
  closed: boolean,
): ValidateFunction {
  const own = params.filter((p) => p.in === location);
  const key = (p: Parameter) => (location === "header" ? p.name.toLowerCase() : p.name);
  return ajv.compile({
    type: "object",
    properties: Object.fromEntries(own.map((p) => [key(p), withComponentRefs(p.schema)])),
    required: own.filter((p) => p.required).map(key),
    additionalProperties: !closed,
  });
}

const compiled = new Map<string, CompiledOperation>();
for (const [path, item] of Object.entries(document.paths)) {
  for (const method of METHODS) {
    const op = item[method];
    if (!op) continue;
    const params = [...(item.parameters ?? []), ...(op.parameters ?? [])].map(resolveParameter);
    const content = op.requestBody?.content ?? {};
    const jsonSchema = content["application/json"]?.schema;
    let validators: Validators | undefined;
    compiled.set(op.operationId, {
      method: method.toUpperCase(),
      honoPath: path.replace(/\{([^}]+)\}/g, ":$1"),
      public: (op.security ?? document.security ?? []).length === 0,
      mediaTypes: Object.keys(content),
      bodyRequired: op.requestBody?.required ?? false,
      headerNames: params.filter((p) => p.in === "header").map((p) => p.name.toLowerCase()),
      validators: () =>
        (validators ??= {
          path: compileParameters(params, "path", true),
          query: compileParameters(params, "query", true),
          header: compileParameters(params, "header", false),
          json: jsonSchema ? ajv.compile(withComponentRefs(jsonSchema)) : null,
        }),
    });
  }
}

function mismatches(
  where: RequestMismatch["in"],
  errors: ErrorObject[] | null | undefined,
): RequestMismatch[] {
  return (errors ?? []).map((e) => {
    const name =
      e.keyword === "required"
        ? String(e.params.missingProperty)
        : e.keyword === "additionalProperties"
          ? String(e.params.additionalProperty)
          : e.instancePath.split("/")[1];
    const message =
      e.keyword === "additionalProperties"
        ? `unknown ${where} ${where === "body" ? "property" : "parameter"}`
        : `${e.instancePath.split("/").slice(2).join(".") || ""} ${e.message ?? "is invalid"}`.trim();
    return name === undefined ? { in: where, message } : { in: where, name, message };
  });
}

function validator(id: string, op: CompiledOperation): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const v = op.validators();
    const errors: RequestMismatch[] = [];
    const path = { ...c.req.param() };
    if (!v.path(path)) errors.push(...mismatches("path", v.path.errors));
    const query: Record<string, string | string[]> = {};
    for (const [name, values] of Object.entries(c.req.queries()))
      query[name] = values.length === 1 ? (values[0] ?? "") : values;
    if (!v.query(query)) errors.push(...mismatches("query", v.query.errors));
    const headers = Object.fromEntries(
      op.headerNames.flatMap((h) => (c.req.header(h) === undefined ? [] : [[h, c.req.header(h)]])),
    );
    if (!v.header(headers)) errors.push(...mismatches("header", v.header.errors));

    let body: unknown;
    if (op.mediaTypes.length > 0 && (op.bodyRequired || hasRequestBody(c))) {
      const mediaType = (c.req.header("content-type") ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
      if (!op.mediaTypes.includes(mediaType)) {
        throw new HttpProblem(
          415,
          "unsupported-media-type",
          `${id} takes ${op.mediaTypes.join(" or ")}, not ${mediaType === "" ? "a body without Content-Type" : mediaType}`,
        );
      }
      // JSON and its structured-syntax types (application/merge-patch+json) share one schema.
      if (v.json && (mediaType === "application/json" || mediaType.endsWith("+json"))) {
        body = await readJsonBody(c);
        if (!v.json(body)) {
          // The body parsed but its content is wrong: 422, with every mismatch.
          throw new HttpProblem(
            422,
            "invalid-body",
            `the request body does not match ${id} in openapi.yaml`,
            [...errors, ...mismatches("body", v.json.errors)],
          );
        }
      }
    }
    const nul = withNul(query) ?? withNul(body);
    if (nul) {
      throw new HttpProblem(422, "invalid-body", `${nul.where} holds a NUL character (U+0000)`, [
        { in: query === nul.root ? "query" : "body", name: nul.where, message: "must not contain U+0000" },
      ]);
    }
    if (errors.length > 0) {
      throw new HttpProblem(
        400,
        "invalid-request",
        `the request does not match ${id} in openapi.yaml`,
        errors,
      );
    }
    c.set("validated", { path, query, body });
    await next();
  };
}

/**
 * Reads a JSON body of at most `limits.maxJsonBodyBytes` (413 beyond, before more is read: the
 * declared length is checked first, then the bytes as they arrive).
 */
async function readJsonBody(c: Context<AppEnv>): Promise<unknown> {
  const maxSize = c.get("ctx").limits.maxJsonBodyBytes;
  const tooLarge = (): never => {
    throw new PayloadTooLargeError(`the JSON body is larger than the limit of ${maxSize} bytes`, {
      limit_bytes: maxSize,
    });
  };
  await bodyLimit({ maxSize, onError: tooLarge })(c, async () => undefined);
  try {
    return await c.req.json();
  } catch {
    throw new HttpProblem(400, "invalid-request", "the request body is not valid JSON");
  }
}

/**
 * The first string (value or key) holding U+0000, with where it is (`a.b.0`): Postgres text
 * cannot store it, so it is refused at the edge rather than failing a query.
 */
function withNul(root: unknown): { root: unknown; where: string } | null {
  const visit = (value: unknown, path: string[]): string[] | null => {
    if (typeof value === "string") return value.includes("\u0000") ? path : null;
    if (value === null || typeof value !== "object") return null;
    for (const [key, item] of Object.entries(value)) {
      if (key.includes("\u0000")) return [...path, key];
      const found = visit(item, [...path, key]);
      if (found) return found;
    }
    return null;
  };
  const path = visit(root, []);
  return path ? { root, where: path.join(".") || "the value" } : null;
}

/**
 * Registers the handler of an operation of openapi.yaml: method and path come from the
 * document, the request is validated against it, and the API key is required unless the
 * operation declares `security: []`.
 */
export function operation<K extends OperationId>(
  app: Hono<AppEnv>,
  id: K,
  handler: (c: Context<AppEnv>, request: ValidRequest<K>) => Response | Promise<Response>,
): void {
  const op = compiled.get(id);
  if (!op) throw new Error(`openapi.yaml has no operation ${id}`);
  const guard: MiddlewareHandler<AppEnv> = op.public ? (_c, next) => next() : authenticate;
  app.on(op.method, op.honoPath, guard, validator(id, op), (c) =>
    handler(c, c.get("validated") as ValidRequest<K>),
  );
}

/** Every operation id in openapi.yaml. */
export const operationIds = [...compiled.keys()];

/**
 * Compiles every operation's validators now, one operation per turn of the event loop, so that
 * requests in between are not held: a long-running server calls it once it listens, and its
 * first request of each operation then does not wait for Ajv (about 50 ms for a merge's body).
 * A Lambda does not: its cold start compiles only what its requests use.
 */
export async function compileAllValidators(): Promise<void> {
  for (const op of compiled.values()) {
    op.validators();
    await new Promise((resolve) => setImmediate(resolve));
  }
}
