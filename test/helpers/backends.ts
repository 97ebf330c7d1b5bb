import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pg from "pg";
import S3rver from "s3rver";
import { type DatabaseHandle, openDatabase } from "../../src/db/client.js";
import { FilesystemStore } from "../../src/storage/fs-store.js";
import type { ObjectStore } from "../../src/storage/object-store.js";
import { S3Store } from "../../src/storage/s3-store.js";

/** The machine's real Postgres; CI and developers' machines run one (trust auth). */
export const POSTGRES_URL = process.env.TEST_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test";

export type DatabaseKind = "pglite" | "postgres";
export type StoreKind = "filesystem" | "s3";

export interface TestResource<T> {
  value: T;
  /** For Postgres: the database's URL, for processes the test starts. */
  url?: string;
  close(): Promise<void>;
}

async function admin(sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: POSTGRES_URL });
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end();
  }
}

/** A new, empty Postgres database on the test server; its URL, dropped on close. */
export async function emptyPostgresDatabase(): Promise<TestResource<string>> {
  const name = `papa_test_${process.pid}_${Math.random().toString(36).slice(2, 10)}`;
  await admin(`create database ${name}`);
  const url = new URL(POSTGRES_URL);
  url.pathname = `/${name}`;
  return { value: url.toString(), close: () => admin(`drop database if exists ${name} with (force)`) };
}

/** A fresh, migrated database: in-memory PGlite, or a new Postgres database dropped on close. */
export async function testDatabase(kind: DatabaseKind): Promise<TestResource<DatabaseHandle>> {
  if (kind === "pglite") {
    const handle = await openDatabase({ pgliteDir: null });
    return { value: handle, close: () => handle.close() };
  }
  const empty = await emptyPostgresDatabase();
  const handle = await openDatabase({ url: empty.value });
  return {
    value: handle,
    url: empty.value,
    close: async () => {
      await handle.close();
      await empty.close();
    },
  };
}

export interface TestStore {
  store: ObjectStore;
  /** The s3rver endpoint, for the S3 store. */
  endpoint?: string;
  /** The root directory, for the filesystem store. */
  dir?: string;
  /** Every object and temp file the store holds, to prove nothing was left behind. */
  everything(): Promise<string[]>;
}

/**
 * A fresh object store: a temp directory (or `dir`, which the caller owns and keeps), or a
 * bucket on an s3rver started on a free port.
 */
export async function testStore(kind: StoreKind, dir?: string): Promise<TestResource<TestStore>> {
  const own = dir ? null : await mkdtemp(join(tmpdir(), `papa-${kind}-`));
  const root = dir ?? own ?? "";
  if (kind === "s3") return s3rverStore(root);
  const store = new FilesystemStore(root);
  return {
    value: {
      store,
      dir: root,
      // Temp files included: an aborted write must not leave one behind either.
      everything: async () => {
        const entries = await readdir(root, { recursive: true, withFileTypes: true }).catch(() => []);
        return entries
          .filter((e) => e.isFile())
          .map((e) => join(e.parentPath, e.name).slice(root.length + 1));
      },
    },
    close: async () => {
      if (own) await rm(own, { recursive: true, force: true });
    },
  };
}

async function s3rverStore(dir: string): Promise<TestResource<TestStore>> {
  const bucket = "papa-test";
  const server = new S3rver({
    port: 0,
    address: "127.0.0.1",
    silent: true,
    directory: dir,
    configureBuckets: [{ name: bucket, configs: [] }],
  });
  const address = (await server.run()) as { port: number };
  const endpoint = `http://127.0.0.1:${address.port}`;
  const store = new S3Store({
    bucket,
    region: "us-east-1",
    endpoint,
    forcePathStyle: true,
    credentials: { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" },
    partSizeBytes: 5 * 1024 * 1024,
  });
  return {
    value: { store, endpoint, everything: () => store.list("") },
    close: async () => {
      store.close();
      await server.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
