import { open } from "node:fs/promises";
import { readFully } from "../storage/fs-store.js";
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
    read: (offset, target) => readFully(handle, offset, target, path),
    close: () => handle.close(),
  };
}

/** `length` bytes from `offset`, in a new buffer. */
export async function readBytes(source: ByteSource, offset: number, length: number): Promise<Uint8Array> {
  const bytes = new Uint8Array(length);
  await source.read(offset, bytes);
  return bytes;
}

/** The header length in a source's 8-byte prefix (one ranged read), checked against `maxHeaderBytes`. */
export async function readHeaderLength(source: ByteSource, maxHeaderBytes: number): Promise<number> {
  if (source.size < 8)
    throw new SafetensorsError("truncated", `file is ${source.size} bytes, shorter than 8`);
  const length = headerLengthOf(await readBytes(source, 0, 8), maxHeaderBytes);
  if (source.size < 8 + length) throw new SafetensorsError("truncated", "file ends inside the header");
  return length;
}

/** Parses and strictly checks the header of a file of `fileSize` bytes, its length included. */
export function headerOfFile(headerBytes: Uint8Array, fileSize: number): SafetensorsHeader {
  const header = parseSafetensorsHeader(headerBytes);
  if (fileSize !== header.dataStart + header.dataBytes) {
    throw new SafetensorsError(
      fileSize < header.dataStart + header.dataBytes ? "truncated" : "length_mismatch",
      `file is ${fileSize} bytes but its header describes ${header.dataStart + header.dataBytes}`,
    );
  }
  return header;
}

/**
 * Reads and strictly checks a safetensors header with two ranged reads (the prefix, then the
 * header), without reading the data, and checks that the source's length is exact.
 */
export async function readSafetensorsHeader(
  source: ByteSource,
  maxHeaderBytes: number,
): Promise<SafetensorsHeader> {
  const length = await readHeaderLength(source, maxHeaderBytes);
  return headerOfFile(await readBytes(source, 8, length), source.size);
}

/** An object in the store (`ObjectStore.read`). */
export function storeSource(store: ObjectStore, key: string, size: number): ByteSource {
  return { size, read: (offset, target) => store.read(key, offset, target), close: async () => undefined };
}
