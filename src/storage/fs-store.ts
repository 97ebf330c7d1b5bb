import { randomUUID } from "node:crypto";
import { createReadStream, createWriteStream, type Dirent } from "node:fs";
import { access, mkdir, open, readdir, rename, rm, stat } from "node:fs/promises";
import { dirname, join, relative, resolve, sep } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import {
  assertValidKey,
  type ByteRange,
  ObjectNotFoundError,
  type ObjectStore,
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

  async put(key: string, body: Readable): Promise<{ sizeBytes: number }> {
    const target = this.path(key);
    const tmp = join(this.root, TMP_DIR, randomUUID());
    await mkdir(dirname(tmp), { recursive: true });
    try {
      await pipeline(body, createWriteStream(tmp, { flags: "wx", highWaterMark: 1 << 20 }));
      const handle = await open(tmp, "r");
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
      await mkdir(dirname(target), { recursive: true });
      await rename(tmp, target);
    } catch (err) {
      body.destroy();
      await rm(tmp, { force: true });
      throw err;
    }
    await syncDirectory(dirname(target));
    return { sizeBytes: (await stat(target)).size };
  }

  async get(key: string, range?: ByteRange): Promise<Readable> {
    const file = this.path(key);
    const handle = await open(file, "r").catch((err: NodeJS.ErrnoException) => {
      throw err.code === "ENOENT" ? new ObjectNotFoundError(key) : err;
    });
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
    const entries = await readdir(this.root).catch(() => [] as string[]);
    for (const name of entries) {
      if (name !== TMP_DIR) await walk(join(this.root, name));
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

async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, "r");
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
