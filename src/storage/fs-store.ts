import { randomUUID } from "node:crypto";
import { createReadStream, type Dirent } from "node:fs";
import { access, type FileHandle, mkdir, open, readdir, rename, rm, stat } from "node:fs/promises";
import { dirname, join, relative, resolve, sep } from "node:path";
import { Readable } from "node:stream";
import {
  assertValidKey,
  type ByteRange,
  ObjectNotFoundError,
  type ObjectStore,
  type ObjectWriter,
  putStream,
  type StoreLocation,
} from "./object-store.js";

const TMP_DIR = ".tmp";

/**
 * Object store on a local directory. Writes go to `<root>/.tmp/<uuid>`, are fsynced and renamed
 * into place, so a reader never sees a partial object and a crash leaves only temp files.
 */
export class FilesystemStore implements ObjectStore {
  readonly kind = "filesystem" as const;
  readonly location: StoreLocation;

  constructor(private readonly root: string) {
    this.location = { kind: "filesystem", root: resolve(root) };
  }

  private path(key: string): string {
    assertValidKey(key);
    return join(this.root, ...key.split("/"));
  }

  put(key: string, body: Readable): Promise<{ sizeBytes: number }> {
    return putStream(this, key, body);
  }

  async create(key: string): Promise<ObjectWriter> {
    const target = this.path(key);
    const tmp = join(this.root, TMP_DIR, randomUUID());
    await mkdir(dirname(tmp), { recursive: true });
    return createFileWriter(tmp, target, true);
  }

  private open(key: string): Promise<FileHandle> {
    return open(this.path(key), "r").catch((err: NodeJS.ErrnoException) => {
      throw err.code === "ENOENT" ? new ObjectNotFoundError(key) : err;
    });
  }

  async get(key: string, range?: ByteRange): Promise<Readable> {
    const handle = await this.open(key);
    if (range && range.end <= range.start) {
      await handle.close();
      return Readable.from([]);
    }
    return createReadStream("", {
      fd: handle,
      highWaterMark: 1 << 20,
      ...(range ? { start: range.start, end: range.end - 1 } : {}),
    });
  }

  async read(key: string, offset: number, target: Uint8Array): Promise<void> {
    const handle = await this.open(key);
    try {
      await readFully(handle, offset, target, key);
    } finally {
      await handle.close();
    }
  }

  async stat(key: string): Promise<{ sizeBytes: number } | null> {
    try {
      return { sizeBytes: (await stat(this.path(key))).size };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw err;
    }
  }

  async delete(key: string): Promise<void> {
    await rm(this.path(key), { force: true });
  }

  async list(prefix: string): Promise<string[]> {
    const keys: string[] = [];
    const walk = async (dir: string): Promise<void> => {
      let entries: Dirent[];
      try {
        entries = await readdir(dir, { withFileTypes: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
        throw err;
      }
      for (const entry of entries) {
        const full = join(dir, entry.name);
        if (entry.isDirectory()) await walk(full);
        else keys.push(relative(this.root, full).split(sep).join("/"));
      }
    };
    // Only the directory the prefix names is walked (a job's scratch, a tenant's checkpoints),
    // not the whole store.
    const base = prefix.slice(0, prefix.lastIndexOf("/") + 1);
    if (base === "") {
      const entries = await readdir(this.root).catch(() => [] as string[]);
      for (const name of entries) {
        if (name !== TMP_DIR) await walk(join(this.root, name));
      }
    } else {
      await walk(this.path(base.slice(0, -1)));
    }
    return keys.filter((k) => k.startsWith(prefix)).sort();
  }

  async presignGet(): Promise<null> {
    return null;
  }

  async sweepIncomplete(olderThanSeconds: number): Promise<number> {
    const dir = join(this.root, TMP_DIR);
    const names = await readdir(dir).catch(() => [] as string[]);
    let removed = 0;
    for (const name of names) {
      const info = await stat(join(dir, name)).catch(() => null);
      if (info && Date.now() - info.mtimeMs > olderThanSeconds * 1000) {
        await rm(join(dir, name), { force: true });
        removed++;
      }
    }
    return removed;
  }

  async ping(): Promise<void> {
    await mkdir(this.root, { recursive: true });
    await access(this.root);
  }
}

/** While a durable file is written, its pages are flushed every this many bytes, so that the final fsync has little left. */
const FLUSH_EVERY_BYTES = 64 * 1024 * 1024;

/**
 * A file written at `tmp` and renamed to `path` by `commit`, so that no reader sees it partial;
 * `abort` removes it. A `durable` file is on disk before it is renamed (and the rename after):
 * its pages are flushed in the background as it grows, then fsynced at `commit`.
 */
export async function createFileWriter(tmp: string, path: string, durable: boolean): Promise<ObjectWriter> {
  const handle = await open(tmp, "w");
  let size = 0;
  let unflushed = 0;
  let flushing: Promise<void> = Promise.resolve();
  return {
    write: async (data) => {
      let written = 0;
      while (written < data.byteLength) {
        written += (await handle.write(data, written, data.byteLength - written)).bytesWritten;
      }
      size += written;
      unflushed += written;
      if (durable && unflushed >= FLUSH_EVERY_BYTES) {
        unflushed = 0;
        // One flush at a time; a failed one fails the commit.
        flushing = flushing.then(() => handle.datasync());
        flushing.catch(() => undefined); // awaited by `commit`: not an unhandled rejection meanwhile
      }
    },
    commit: async () => {
      if (durable) {
        await flushing;
        await handle.sync();
      }
      await handle.close();
      await mkdir(dirname(path), { recursive: true });
      await rename(tmp, path);
      if (durable) await syncDirectory(dirname(path));
      return { sizeBytes: size };
    },
    abort: async () => {
      await flushing.catch(() => undefined);
      await handle.close().catch(() => undefined);
      await rm(tmp, { force: true });
    },
  };
}

/** Fills `target` from the file's byte `offset`; `name` is what an error calls the file. */
export async function readFully(
  handle: FileHandle,
  offset: number,
  target: Uint8Array,
  name: string,
): Promise<void> {
  let filled = 0;
  while (filled < target.byteLength) {
    const { bytesRead } = await handle.read(target, filled, target.byteLength - filled, offset + filled);
    if (bytesRead === 0) throw new Error(`${name} ends before byte ${offset + target.byteLength}`);
    filled += bytesRead;
  }
}

async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
