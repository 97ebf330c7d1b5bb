import { createFileWriter } from "../storage/fs-store.js";
import type { ObjectWriter } from "../storage/object-store.js";
import { DTYPE_BITS } from "../tensors/dtypes.js";
import { FLOAT_BYTES, isFloatDtype } from "../tensors/floats.js";
import { type ByteSource, readBytes } from "../tensors/source.js";
import type { Block, MergePlan, PlannedTensor } from "./plan.js";
import type { MergePool } from "./pool.js";

/** Where one output goes, written strictly in order: header, then every block (a store's writer, or any). */
export type OutputSink = Pick<ObjectWriter, "write">;

export interface RunMergeOptions {
  plan: MergePlan;
  /** One per input, in the order of the plan's coefficient columns. */
  sources: ByteSource[];
  /** One per output, in the order of the plan's coefficient rows. */
  sinks: OutputSink[];
  pool: MergePool;
  signal?: AbortSignal | undefined;
  onProgress?: ((doneBytes: number, totalBytes: number) => void) | undefined;
  /** Where the time goes, added up here when given. */
  stages?: MergeStages | undefined;
}

/**
 * Milliseconds a merge spent reading its inputs, merging on its threads (the threads' own time)
 * and writing its outputs, each summed over the blocks: blocks are in flight together and the
 * stages overlap, so they add up to more than the merge's time.
 */
export interface MergeStages {
  readMs: number;
  mergeMs: number;
  writeMs: number;
}

/** Shared memory for one block in flight: an input buffer per input, an output buffer per output. */
interface Slot {
  inputs: Uint8Array[];
  outputs: Uint8Array[];
}

/** Bytes of shared memory all slots together may use; the block size is derived from it. */
export const SLOT_MEMORY_BYTES = 128 * 1024 * 1024;

/** How many blocks may be in flight with a pool of `threads` threads. */
export function slotCount(threads: number): number {
  return Math.max(2, threads * 2);
}

/**
 * Elements per block so that `slots` blocks of `inputs` inputs and `outputs` outputs (8 bytes
 * an element at most) fit in SLOT_MEMORY_BYTES; between 64 Ki and 1 Mi elements.
 */
export function blockElementsFor(inputs: number, outputs: number, slots: number): number {
  const fit = Math.floor(SLOT_MEMORY_BYTES / (slots * (inputs + outputs) * 8));
  return Math.max(1 << 16, Math.min(1 << 20, fit));
}

/** The slots' sizes: each input's and each output's buffer, in bytes, 8-aligned for any float view. */
function slotSizes(plan: MergePlan): { inBytes: number; outBytes: number } {
  let inBytes = 0;
  let outBytes = 0;
  for (const block of plan.blocks) {
    const t = plan.tensors[block.tensor] as PlannedTensor;
    if (!t.averaged || !isFloatDtype(t.dtype) || !isFloatDtype(t.outDtype)) continue;
    inBytes = Math.max(inBytes, block.count * FLOAT_BYTES[t.dtype]);
    outBytes = Math.max(outBytes, block.count * FLOAT_BYTES[t.outDtype]);
  }
  const align = (bytes: number) => Math.ceil(bytes / 8) * 8;
  return { inBytes: align(inBytes), outBytes: align(outBytes) };
}

/** `count` slots of `inputs` and `outputs` buffers, laid out one after another in `memory`. */
function carveSlots(
  memory: SharedArrayBuffer,
  sizes: { inBytes: number; outBytes: number },
  inputs: number,
  outputs: number,
  count: number,
): Slot[] {
  let offset = 0;
  const take = (bytes: number) => {
    offset += bytes;
    return new Uint8Array(memory, offset - bytes, bytes);
  };
  return Array.from({ length: count }, () => ({
    inputs: Array.from({ length: inputs }, () => take(sizes.inBytes)),
    outputs: Array.from({ length: outputs }, () => take(sizes.outBytes)),
  }));
}

/**
 * Streams a planned merge: block by block, reads the block from every input into shared
 * memory, merges it on the pool (or copies it: integer and bool tensors from each output's
 * `copyFrom` input, excluded tensors from the first input) and writes it to every output, in
 * order. A fixed ring of slots is reused, so memory does not grow with the size or the number
 * of blocks, and nothing is allocated per block on the hot path; the slots' memory is the
 * pool's, reused by the next merge.
 */
export async function runMerge(options: RunMergeOptions): Promise<void> {
  const { plan, sources, sinks, pool, signal } = options;
  const stages = options.stages ?? { readMs: 0, mergeMs: 0, writeMs: 0 };
  const writeAll = async (outputs: Uint8Array[]) => {
    const started = performance.now();
    for (const [j, sink] of sinks.entries()) await sink.write(outputs[j] ?? new Uint8Array(0));
    stages.writeMs += performance.now() - started;
  };
  await writeAll(sinks.map(() => plan.headerBytes));
  const count = slotCount(pool.size);
  const sizes = slotSizes(plan);
  const memory = pool.borrowMemory(count * (sources.length * sizes.inBytes + sinks.length * sizes.outBytes));
  const slots = carveSlots(memory, sizes, sources.length, sinks.length, count);
  const pending: Promise<Uint8Array[]>[] = [];
  const total = plan.outputBytes - plan.headerBytes.length;
  let started = 0;
  let done = 0;
  for (let i = 0; i < plan.blocks.length; i++) {
    // Block `started` reuses the slot of block `started - slots.length`, already written.
    while (started < plan.blocks.length && started < i + slots.length) {
      const block = plan.blocks[started] as Block;
      const work = processBlock(
        plan,
        block,
        sources,
        pool,
        slots[started % slots.length] as Slot,
        sinks.length,
        stages,
      );
      work.catch(() => undefined); // awaited in order below; no unhandled rejection meanwhile
      pending.push(work);
      started++;
    }
    const outputs = (await pending.shift()) ?? [];
    signal?.throwIfAborted();
    await writeAll(outputs);
    done += outputs[0]?.byteLength ?? 0;
    options.onProgress?.(done, total);
  }
  // Only now is no block using the slots: after a failure, blocks in flight may still be.
  pool.returnMemory(memory);
}

async function processBlock(
  plan: MergePlan,
  block: Block,
  sources: ByteSource[],
  pool: MergePool,
  slot: Slot,
  outputCount: number,
  stages: MergeStages,
): Promise<Uint8Array[]> {
  const timedRead = async <T>(work: Promise<T>): Promise<T> => {
    const started = performance.now();
    try {
      return await work;
    } finally {
      stages.readMs += performance.now() - started;
    }
  };
  const tensor = plan.tensors[block.tensor] as PlannedTensor;
  const { dtype, outDtype } = tensor;
  const start = (block.start * DTYPE_BITS[dtype]) / 8;
  const length = (block.count * DTYPE_BITS[dtype]) / 8;
  if (!tensor.averaged || !isFloatDtype(dtype) || !isFloatDtype(outDtype)) {
    // Each output's own source (`plan.copyFrom`); an excluded tensor has only the first input's.
    const from = (j: number) => (tensor.inputOffsets.length > 1 ? (plan.copyFrom[j] ?? 0) : 0);
    const read = new Map<number, Promise<Uint8Array>>();
    for (let j = 0; j < outputCount; j++) {
      const k = from(j);
      if (!read.has(k)) {
        read.set(k, readBytes(sources[k] as ByteSource, (tensor.inputOffsets[k] ?? 0) + start, length));
      }
    }
    return timedRead(
      Promise.all(Array.from({ length: outputCount }, (_, j) => read.get(from(j)) as Promise<Uint8Array>)),
    );
  }
  const inputs = slot.inputs.map((b) => b.subarray(0, length));
  await timedRead(
    Promise.all(
      sources.map((source, k) => source.read((tensor.inputOffsets[k] ?? 0) + start, inputs[k] as Uint8Array)),
    ),
  );
  const outputs = slot.outputs.map((b) => b.subarray(0, block.count * FLOAT_BYTES[outDtype]));
  stages.mergeMs += await pool.run({
    dtype,
    outDtype,
    count: block.count,
    inputs,
    outputs,
    coefficients: plan.coefficients,
  });
  return outputs;
}

/** A local output file, written to a temp name and renamed into place by `commit`. */
export function openFileSink(path: string): Promise<ObjectWriter> {
  return createFileWriter(`${path}.partial-${process.pid}`, path, false);
}
