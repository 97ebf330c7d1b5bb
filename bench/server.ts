import type { ChildProcess } from "node:child_process";
import type { Readable } from "node:stream";

/** The URL a starting server logs once it listens (its JSON log line `listening`). */
export function listeningUrl(server: ChildProcess & { stdout: Readable }): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = "";
    server.stdout.on("data", (d: Buffer) => {
      out += d.toString();
      const url = out.match(/"msg":"listening","url":"([^"]+)"/)?.[1];
      if (url) resolve(url);
    });
    server.on("exit", (code) => reject(new Error(`server exited with ${code}`)));
  });
}
