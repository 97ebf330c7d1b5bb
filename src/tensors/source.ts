import { open } from "node:fs/promises";
import type { ObjectStore } from "../storage/object-store.js";
import {
  headerLengthOf,
  parseSafetensorsHeader,
  SafetensorsError,
  type SafetensorsHeader,
} from "./safetensors.js";

/** Random access to the bytes of one file: a local file, or an object in the store. */
export interface ByteSource {
  readonly size: number;
  /** Fills `target` with the bytes from `offset`; rejects if the source is shorter. */
  read(offset: number, target: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

/** A local file, read with positional reads. */
export async function openFileSource(path: string): Promise<ByteSource> {
  const handle = await open(path, "r");
  const { size } = await handle.stat();
  return {
    size,
    read: async (offset, target) => {
      let filled = 0;
      while (filled < target.byteLength) {
        const { bytesRead } = await handle.read(target, filled, target.byteLength - filled, offset + filled);
        if (bytesRead === 0) throw new Error(`${path} ends before byte ${offset + target.byteLength}`);
        filled += bytesRead;
      }
    },
    close: () => handle.close(),
  };
}

/** `length` bytes from `offset`, in a new buffer. */
export async function readBytes(source: ByteSource, offset: number, length: number): Promise<Uint8Array> {
  const bytes = new Uint8Array(length);
  await source.read(offset, bytes);
  return bytes;
}

/**
 * Reads and strictly checks a safetensors header with two ranged reads (the prefix, then the
 * header), without reading the data, and checks that the source's length is exact.
 */
export async function readSafetensorsHeader(
  source: ByteSource,
  maxHeaderBytes: number,
): Promise<SafetensorsHeader> {
  if (source.size < 8)
    throw new SafetensorsError("truncated", `file is ${source.size} bytes, shorter than 8`);
  const length = headerLengthOf(await readBytes(source, 0, 8), maxHeaderBytes);
  if (source.size < 8 + length) throw new SafetensorsError("truncated", "file ends inside the header");
  const header = parseSafetensorsHeader(await readBytes(source, 8, length));
  if (source.size !== header.dataStart + header.dataBytes) {
    throw new SafetensorsError(
      source.size < header.dataStart + header.dataBytes ? "truncated" : "length_mismatch",
      `file is ${source.size} bytes but its header describes ${header.dataStart + header.dataBytes}`,
    );
  }
  return header;
}

/** An object in the store, read with ranged GETs. */
export function storeSource(store: ObjectStore, key: string, size: number): ByteSource {
  return {
    size,
    read: async (offset, target) => {
      let filled = 0;
      for await (const chunk of await store.get(key, { start: offset, end: offset + target.byteLength })) {
        const bytes = chunk as Uint8Array;
        target.set(bytes.subarray(0, target.byteLength - filled), filled);
        filled += bytes.byteLength;
      }
      if (filled < target.byteLength)
        throw new Error(`object ${key} ends before byte ${offset + target.byteLength}`);
    },
    close: async () => undefined,
  };
}
