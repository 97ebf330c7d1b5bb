import { expect } from "vitest";
import type { Harness } from "./harness.js";
import { buildSafetensors, f32 } from "./safetensors.js";

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

/** The `w` (F32, 4 values) and `steps` (I64) tensors of checkpoint `id`, as the test checkpoints hold them. */
export async function weightsOf(h: Harness, id: string): Promise<{ w: number[]; steps: bigint }> {
  const bytes = Buffer.from(await (await h.request(`/v1/checkpoints/${id}/weights`)).arrayBuffer());
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString()) as Record<
    string,
    { data_offsets: [number, number] }
  >;
  const at = (name: string) =>
    bytes.subarray(
      8 + n + (header[name]?.data_offsets[0] ?? 0),
      8 + n + (header[name]?.data_offsets[1] ?? 0),
    );
  const w = at("w");
  return { w: [0, 1, 2, 3].map((i) => w.readFloatLE(i * 4)), steps: at("steps").readBigInt64LE(0) };
}

/** Checkpoint k: w = [k, 2k, -k, 1] (F32) and an I64 counter 10 + k. */
export function member(k: number, extra: { name: string; shape: number[] } | null = null): Buffer {
  const counter = Buffer.alloc(8);
  counter.writeBigInt64LE(BigInt(10 + k));
  return buildSafetensors([
    { name: "w", dtype: "F32", shape: [4], data: f32([k, 2 * k, -k, 1]) },
    { name: "steps", dtype: "I64", shape: [], data: counter },
    ...(extra
      ? [{ name: extra.name, dtype: "F32", shape: extra.shape, data: f32(Array(extra.shape[0]).fill(k)) }]
      : []),
  ]);
}
