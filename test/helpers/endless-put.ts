/**
 * A writer to kill: puts an endless stream to the S3 store at S3_ENDPOINT (bucket papa-test) under
 * KEY, 1 MiB every 10 ms, until the process dies.
 */
import { Readable } from "node:stream";
import { S3Store } from "../../src/storage/s3-store.js";

const store = new S3Store({
  bucket: "papa-test",
  region: "us-east-1",
  endpoint: process.env.S3_ENDPOINT,
  forcePathStyle: true,
  credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" },
  partSizeBytes: 5 * 1024 * 1024,
});
const chunk = Buffer.alloc(1 << 20, 7);
await store.put(
  process.env.KEY ?? "endless.bin",
  Readable.from(
    (async function* () {
      for (;;) {
        yield chunk;
        await new Promise((r) => setTimeout(r, 10));
      }
    })(),
  ),
);
