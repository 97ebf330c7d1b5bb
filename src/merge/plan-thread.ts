import { parentPort } from "node:worker_threads";
import { SafetensorsError } from "../tensors/safetensors.js";
import { headerOfFile } from "../tensors/source.js";
import { MergeMismatchError, planMerge } from "./plan.js";
import type { PlanReply, PlanRequest } from "./preflight.js";

/** Worker thread: parses the inputs' headers and plans the merge, off the caller's event loop. */
parentPort?.on("message", ({ id, headers, options, wantPlan }: PlanRequest) => {
  let reply: PlanReply;
  try {
    const parsed = headers.map((h) => headerOfFile(h.bytes, h.size));
    const plan = planMerge({ ...options, headers: parsed });
    reply = { id, plan: wantPlan ? plan : null };
  } catch (err) {
    const error = err as Error;
    reply = {
      id,
      error:
        err instanceof SafetensorsError
          ? { kind: "safetensors", problem: err.problem, message: err.message }
          : err instanceof MergeMismatchError
            ? { kind: "mismatch", tensor: err.tensor, message: err.message }
            : { kind: "other", message: error.message },
    };
  }
  parentPort?.postMessage(reply);
});
