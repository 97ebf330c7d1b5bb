import { SafetensorsError, type SafetensorsHeader } from "./safetensors.js";
import type { ByteSource } from "./source.js";

/**
 * Sharded weights seen as one file: the shards' bytes back to back. A tensor's offset in the
 * whole is its shard's start plus its offset in the shard, so whatever reads one file by offsets
 * (the merge engine) reads shards unchanged; no read crosses a shard, as none crosses a tensor.
 */
export function concatSources(shards: ByteSource[]): ByteSource {
  if (shards.length === 1) return shards[0] as ByteSource;
  const starts: number[] = [];
  let size = 0;
  for (const shard of shards) {
    starts.push(size);
    size += shard.size;
  }
  return {
    size,
    read: (offset, target) => {
      let k = starts.length - 1;
      while (k > 0 && (starts[k] as number) > offset) k--;
      const start = starts[k] as number;
      const shard = shards[k] as ByteSource;
      if (offset + target.byteLength > start + shard.size) {
        throw new RangeError(`a read of ${target.byteLength} bytes at ${offset} crosses shard ${k}'s end`);
      }
      return shard.read(offset - start, target);
    },
    close: async () => {
      await Promise.all(shards.map((s) => s.close()));
    },
  };
}

/**
 * The header of shards seen as one file (`concatSources`): their tensors in shard order, each at
 * its offset in the whole (the data section starts at 0), the first shard's metadata, and how
 * many tensors each shard holds. A tensor in two shards is a `SafetensorsError`.
 */
export function concatHeaders(headers: SafetensorsHeader[]): {
  header: SafetensorsHeader;
  tensorCounts: number[];
} {
  const first = headers[0];
  if (!first) throw new Error("no shards");
  if (headers.length === 1) return { header: first, tensorCounts: [first.tensors.length] };
  const seen = new Set<string>();
  const tensors: SafetensorsHeader["tensors"] = [];
  let start = 0;
  for (const h of headers) {
    for (const t of h.tensors) {
      if (seen.has(t.name)) {
        throw new SafetensorsError("invalid_header", `tensor ${JSON.stringify(t.name)} is in two shards`);
      }
      seen.add(t.name);
      const at = start + h.dataStart;
      tensors.push({ ...t, begin: at + t.begin, end: at + t.end });
    }
    start += h.dataStart + h.dataBytes;
  }
  return {
    header: { tensors, metadata: first.metadata, dataStart: 0, dataBytes: start },
    tensorCounts: headers.map((h) => h.tensors.length),
  };
}
