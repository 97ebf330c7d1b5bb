import type { IncomingHttpHeaders } from "node:http";
import type { Readable } from "node:stream";
import busboy from "busboy";
import type { UploadedFile } from "../services/checkpoints/multi-file.js";
import { InvalidInputError } from "../services/errors.js";

/**
 * The files of a `multipart/form-data` body, in order, streamed: each is to be read to its end
 * (or the iteration ended) before the next arrives. Fields other than files are refused. When
 * the iteration ends early (a refused file), the body is detached unread, as `pipeUpload` does.
 */
export async function* multipartFiles(
  headers: IncomingHttpHeaders,
  body: Readable,
): AsyncGenerator<UploadedFile> {
  let parser: busboy.Busboy;
  try {
    parser = busboy({ headers, defParamCharset: "utf8" });
  } catch (err) {
    throw new InvalidInputError(`not a multipart/form-data body: ${(err as Error).message}`);
  }
  const arrived: (UploadedFile | Error | null)[] = [];
  let wake: (() => void) | null = null;
  const push = (item: UploadedFile | Error | null) => {
    arrived.push(item);
    wake?.();
    wake = null;
  };
  parser.on("file", (_field, stream, info) => push({ name: info.filename ?? "", body: stream }));
  parser.on("field", (field) =>
    push(new InvalidInputError(`form field ${JSON.stringify(field)} is not a file; only files are taken`)),
  );
  parser.on("error", (err) =>
    push(new InvalidInputError(`malformed multipart body: ${(err as Error).message}`)),
  );
  parser.on("close", () => push(null));
  body.pipe(parser);
  try {
    for (;;) {
      while (arrived.length === 0) await new Promise<void>((resolve) => (wake = resolve));
      const item = arrived.shift();
      if (item === null || item === undefined) return;
      if (item instanceof Error) throw item;
      yield item;
    }
  } finally {
    body.unpipe(parser);
    body.pause();
    parser.removeAllListeners("file");
    parser.on("error", () => undefined);
  }
}
