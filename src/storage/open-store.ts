import { FilesystemStore } from "./fs-store.js";
import type { ObjectStore, StoreLocation } from "./object-store.js";
import { S3Store } from "./s3-store.js";

/** The store at `location`, as its own process opened it. `close` releases its connections. */
export function openStore(location: StoreLocation): ObjectStore & { close(): void } {
  if (location.kind === "s3") return new S3Store(location.options);
  return Object.assign(new FilesystemStore(location.root), { close: () => undefined });
}
