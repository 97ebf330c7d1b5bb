import { parentPort } from "node:worker_threads";
import { type BlockTask, mergeBlock } from "./kernel.js";

/** Worker thread: merges blocks in place; inputs and outputs are views on shared memory. */
parentPort?.on("message", (task: BlockTask) => {
  try {
    mergeBlock(task);
    parentPort?.postMessage({ ok: true });
  } catch (err) {
    parentPort?.postMessage({ ok: false, error: (err as Error).message });
  }
});
