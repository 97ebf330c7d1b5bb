import createClient, { type Client } from "openapi-fetch";
import type { components, paths } from "./generated/openapi.js";

export type { components, paths } from "./generated/openapi.js";
export type Problem = components["schemas"]["Problem"];
export type PapaClient = Client<paths>;

/** An RFC 9457 problem the API answered with, typed. */
export class PapaProblemError extends Error {
  constructor(readonly problem: Problem) {
    super(`${problem.status} ${problem.title}: ${problem.detail} (request ${problem.request_id})`);
    this.name = "PapaProblemError";
  }
}

/**
 * A typed client for the papa-service API, generated from openapi.yaml (openapi-fetch): every
 * path, parameter and body is checked by TypeScript. Pass `fetch` to route requests elsewhere.
 */
export function createPapaClient(options: {
  baseUrl: string;
  apiKey: string;
  fetch?: (input: Request) => Promise<Response>;
}): PapaClient {
  return createClient<paths>({
    baseUrl: options.baseUrl,
    headers: { Authorization: `Bearer ${options.apiKey}` },
    ...(options.fetch ? { fetch: options.fetch } : {}),
  });
}

/** The data of a successful call, or a thrown `PapaProblemError` carrying the problem document. */
export function unwrap<T>(result: { data?: T; error?: unknown; response: Response }): T {
  if (result.error !== undefined || result.data === undefined) {
    const problem = result.error as Partial<Problem> | undefined;
    throw new PapaProblemError({
      type: problem?.type ?? "about:blank",
      title: problem?.title ?? result.response.statusText,
      status: problem?.status ?? result.response.status,
      detail: problem?.detail ?? "the API answered without a problem document",
      request_id: problem?.request_id ?? result.response.headers.get("x-request-id") ?? "",
    });
  }
  return result.data;
}
