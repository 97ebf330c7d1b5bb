import { parentPort } from "node:worker_threads";
import { serveThread } from "../../src/threads.js";

/** A thread for test/threads.test.ts: echoes, fails with a coded error, answers late, or dies. */
serveThread(parentPort, async (request: { op: "echo" | "fail" | "late" | "die"; value: number }) => {
  if (request.op === "fail") throw Object.assign(new Error(`refused ${request.value}`), { code: "E_TEST" });
  if (request.op === "late") await new Promise((r) => setTimeout(r, 50));
  if (request.op === "die") process.exit(3);
  return request.value;
});
