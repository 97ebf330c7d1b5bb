import type { Readable, Writable } from "node:stream";
import { finished } from "node:stream";

/**
 * Pipes a request body into `dest` (a validator the store consumes). Unlike `pipeline`, a failure
 * of `dest` (invalid bytes, a limit) detaches the body without destroying it: under the Node
 * server the body is the connection, and destroying it would reset the connection before the
 * problem is answered. A failing body (the client went away) destroys `dest`.
 */
export function pipeUpload(body: Readable, dest: Writable): Promise<void> {
  return new Promise((resolve, reject) => {
    const cleanup = finished(body, { writable: false }, (err) => {
      if (err) dest.destroy(err);
    });
    finished(dest, { readable: false }, (err) => {
      cleanup();
      if (!err) return resolve();
      body.unpipe(dest);
      body.pause();
      reject(err);
    });
    body.pipe(dest);
  });
}
