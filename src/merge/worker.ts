import { parentPort } from "node:worker_threads";
import { type BlockTask, mergeBlock } from "./kernel.js";

/** Worker thread: merges blocks in place (inputs and outputs are views on shared memory); answers how long it took. */
parentPort?.on("message", (task: BlockTask) => {
  try {
    const started = performance.now();
    mergeBlock(task);
    parentPort?.postMessage({ ok: true, ms: performance.now() - started });
  } catch (err) {
    parentPort?.postMessage({ ok: false, error: (err as Error).message });
  }
});
