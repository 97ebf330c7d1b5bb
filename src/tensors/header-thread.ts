import { parentPort } from "node:worker_threads";
import { serveThread } from "../threads.js";
import { digestHeader, parseSafetensorsHeader, SafetensorsError } from "./safetensors.js";

/** Worker thread: parses large safetensors headers for `SafetensorsValidator`. */
serveThread(parentPort, (bytes: Uint8Array) => {
  try {
    return { digest: digestHeader(parseSafetensorsHeader(bytes)) };
  } catch (err) {
    if (!(err instanceof SafetensorsError)) throw err;
    return { error: { problem: err.problem, message: err.message } };
  }
});
