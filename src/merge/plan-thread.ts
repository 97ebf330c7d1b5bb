import { parentPort } from "node:worker_threads";
import { SafetensorsError } from "../tensors/safetensors.js";
import { concatHeaders } from "../tensors/shards.js";
import { headerOfFile } from "../tensors/source.js";
import { serveThread } from "../threads.js";
import { MergeInputError, planMerge } from "./plan.js";
import type { PlanReply, PlanRequest } from "./preflight.js";

/** Worker thread: parses the inputs' headers and plans the merge, off the caller's event loop. */
serveThread<PlanRequest, PlanReply>(parentPort, ({ headers, options, wantPlan }) => {
  try {
    const inputs = headers.map((shards) => concatHeaders(shards.map((h) => headerOfFile(h.bytes, h.size))));
    const { outputShardNames, ...rest } = options;
    const counts = inputs[0]?.tensorCounts ?? [];
    const plan = planMerge({
      ...rest,
      headers: inputs.map((input) => input.header),
      outputShards: outputShardNames?.map((name, k) => ({ name, tensorCount: counts[k] ?? 0 })),
    });
    return { plan: wantPlan ? plan : null };
  } catch (err) {
    if (err instanceof SafetensorsError) {
      return { error: { kind: "safetensors", problem: err.problem, message: err.message } };
    }
    if (err instanceof MergeInputError) {
      return { error: { kind: "input", tensor: err.tensor, message: err.message } };
    }
    return { error: { kind: "other", message: (err as Error).message } };
  }
});
