import { expect } from "vitest";
import type { Harness } from "./harness.js";

export interface JobBody {
  id: string;
  status: string;
  progress: number;
  result: { checkpoints: { id: string; name: string; sha256: string; size_bytes: number }[] } | null;
  problem: { detail: string } | null;
  params: Record<string, unknown>;
  events_url: string;
}

/** Polls a job until it is finished (or `timeoutMs` passes) and returns it. */
export async function waitForJob(
  h: Pick<Harness, "request">,
  id: string,
  timeoutMs = 30_000,
): Promise<JobBody> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const job = (await (await h.request(`/v1/jobs/${id}`)).json()) as JobBody;
    if (["succeeded", "failed", "canceled"].includes(job.status)) return job;
    if (Date.now() > until) throw new Error(`job ${id} still ${job.status} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export async function postMerge(
  h: Pick<Harness, "request">,
  body: object,
  headers: Record<string, string> = {},
) {
  return h.request("/v1/merges", {
    method: "POST",
    body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", ...headers },
  });
}

/** Merges and waits for success; returns the job. */
export async function mergeAndWait(h: Pick<Harness, "request">, body: object): Promise<JobBody> {
  const res = await postMerge(h, body);
  expect(res.status).toBe(202);
  const job = await waitForJob(h, ((await res.json()) as JobBody).id);
  expect(job.status, JSON.stringify(job.problem)).toBe("succeeded");
  return job;
}
