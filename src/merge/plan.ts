import { DTYPE_BITS, type Dtype } from "../tensors/dtypes.js";
import { type FloatDtype, isFloatDtype } from "../tensors/floats.js";
import {
  encodeSafetensorsHeader,
  type SafetensorsHeader,
  type TensorLayout,
} from "../tensors/safetensors.js";
import { copySources } from "./methods.js";

/**
 * Inputs that cannot be merged: tensors that do not line up, or a dtype that cannot be averaged.
 * The message names the first offending tensor.
 */
export class MergeInputError extends Error {
  constructor(
    message: string,
    readonly tensor: string,
  ) {
    super(message);
    this.name = "MergeInputError";
  }
}

/** Dtypes copied rather than averaged: integers and bool. */
const COPIED_DTYPES: ReadonlySet<Dtype> = new Set([
  "BOOL",
  "U8",
  "I8",
  "I16",
  "U16",
  "I32",
  "U32",
  "I64",
  "U64",
]);

export interface PlannedTensor {
  name: string;
  dtype: Dtype;
  outDtype: Dtype;
  elements: number;
  /** Averaged with the coefficients (floats), or copied (integers, bool, excluded). */
  averaged: boolean;
  /**
   * Absolute byte offset of the tensor's data in each input; only the first input's for an
   * excluded tensor, which the other inputs need not have.
   */
  inputOffsets: number[];
  /** Absolute byte offset of the tensor's data in every output. */
  outputOffset: number;
}

/** A slice of one tensor, the unit of work: small enough that a few fit in memory. */
export interface Block {
  tensor: number;
  /** First element and element count. */
  start: number;
  count: number;
}

/** One file of sharded outputs: its tensors, its header, and its size with the header. */
export interface OutputShard {
  name: string;
  tensors: string[];
  headerBytes: Uint8Array;
  bytes: number;
}

export interface MergePlan {
  /** rows[j][k]: input k's weight in output j. */
  coefficients: number[][];
  /** copyFrom[j]: the input output j's integer and bool tensors come from (`copySources`). */
  copyFrom: number[];
  tensors: PlannedTensor[];
  blocks: Block[];
  /** Prefix and header of every output file (they share one layout). */
  headerBytes: Buffer;
  outputBytes: number;
  /**
   * Sharded outputs (`outputShards`): the files the output's bytes after `headerBytes` make, in
   * order, each with its own header; null for one file.
   */
  shards: OutputShard[] | null;
}

/**
 * A matcher for a glob where `*` matches any run of characters and everything else is literal.
 * It never backtracks: the literal pieces between stars are found left to right, each at its
 * first place after the previous one (the leftmost match leaves the most room for the rest), so
 * a match costs at most one scan of the name per piece. (A backtracking regular expression took
 * seconds for `*a*a*a*a*a*a*a*a*a*ab` against a 40-character name.)
 */
export function globMatcher(pattern: string): (name: string) => boolean {
  const pieces = pattern.split("*");
  const first = pieces[0] ?? "";
  if (pieces.length === 1) return (name) => name === first;
  const last = pieces.at(-1) ?? "";
  const middle = pieces.slice(1, -1).filter((p) => p !== "");
  return (name) => {
    if (name.length < first.length + last.length) return false;
    if (!name.startsWith(first) || !name.endsWith(last)) return false;
    let at = first.length;
    const end = name.length - last.length;
    for (const piece of middle) {
      const found = name.indexOf(piece, at);
      if (found === -1 || found + piece.length > end) return false;
      at = found + piece.length;
    }
    return true;
  };
}

export interface PlanOptions {
  headers: SafetensorsHeader[];
  coefficients: number[][];
  /** How to name input k in messages (a checkpoint id, a file name). */
  labels: string[];
  /** Tensor name patterns copied from the first input instead of averaged (and not compared). */
  exclude?: string[];
  /** Float dtype of averaged tensors in the outputs (default: the inputs' dtype). */
  outputDtype?: FloatDtype | undefined;
  metadata?: Record<string, string>;
  /** Elements per block (see `blockElementsFor`). */
  blockElements: number;
  /**
   * Shard the outputs as the first input is: each shard's name and how many of its tensors
   * (consecutive, in the first input's order) it holds.
   */
  outputShards?: { name: string; tensorCount: number }[] | undefined;
}

/**
 * Checks that the inputs agree (every tensor name, shape and dtype, except excluded names) and
 * that every tensor not excluded is a float the engine averages (F64, F32, F16, BF16, F8_E4M3,
 * F8_E5M2) or an integer or bool it copies; lays out the outputs: the first input's tensor
 * order, the output dtype for averaged tensors.
 */
export function planMerge(options: PlanOptions): MergePlan {
  const { headers, labels, coefficients } = options;
  const [first, ...rest] = headers;
  if (!first) throw new Error("a merge needs at least one input");
  const excluded = (options.exclude ?? []).map(globMatcher);
  const isExcluded = (name: string) => excluded.some((matches) => matches(name));
  const byName = headers.map((h) => new Map(h.tensors.map((t) => [t.name, t])));

  for (const t of first.tensors) {
    if (isExcluded(t.name)) continue;
    if (!isFloatDtype(t.dtype) && !COPIED_DTYPES.has(t.dtype)) {
      throw new MergeInputError(
        `tensor ${JSON.stringify(t.name)} is ${t.dtype}, which cannot be averaged (floats: F64, F32, F16, BF16, F8_E4M3, F8_E5M2); exclude it to copy it from the first input`,
        t.name,
      );
    }
    rest.forEach((_, i) => {
      const other = byName[i + 1]?.get(t.name);
      const where = `tensor ${JSON.stringify(t.name)}`;
      if (!other)
        throw new MergeInputError(`${where} is in ${labels[0]} but not in ${labels[i + 1]}`, t.name);
      if (other.dtype !== t.dtype) {
        throw new MergeInputError(
          `${where} is ${t.dtype} in ${labels[0]} but ${other.dtype} in ${labels[i + 1]}`,
          t.name,
        );
      }
      if (other.shape.join(",") !== t.shape.join(",")) {
        throw new MergeInputError(
          `${where} has shape [${t.shape}] in ${labels[0]} but [${other.shape}] in ${labels[i + 1]}`,
          t.name,
        );
      }
    });
  }
  rest.forEach((h, i) => {
    const extra = h.tensors.find((t) => !isExcluded(t.name) && !byName[0]?.has(t.name));
    if (extra) {
      throw new MergeInputError(
        `tensor ${JSON.stringify(extra.name)} is in ${labels[i + 1]} but not in ${labels[0]}`,
        extra.name,
      );
    }
  });

  const layout = first.tensors.map((t) => {
    const excluded = isExcluded(t.name);
    const averaged = !excluded && isFloatDtype(t.dtype);
    return {
      t,
      excluded,
      averaged,
      outDtype: averaged && options.outputDtype ? options.outputDtype : t.dtype,
    };
  });
  // The first input's `format` stays: transformers refuses safetensors without a known one.
  const format = first.metadata?.format;
  const metadata = format === undefined ? options.metadata : { format, ...options.metadata };
  const outputLayout = layout.map(({ t, outDtype }) => ({ name: t.name, dtype: outDtype, shape: t.shape }));
  const encoded = encodeSafetensorsHeader(outputLayout, metadata ?? null);
  const { blockElements } = options;
  const tensors: PlannedTensor[] = [];
  const blocks: Block[] = [];
  layout.forEach(({ t, excluded, averaged, outDtype }, index) => {
    const elements = t.shape.reduce((a, b) => a * b, 1);
    const out = encoded.header.tensors[index];
    if (!out) throw new Error("header layout lost a tensor");
    tensors.push({
      name: t.name,
      dtype: t.dtype,
      outDtype,
      elements,
      averaged,
      inputOffsets: excluded
        ? [first.dataStart + t.begin]
        : headers.map((h, k) => h.dataStart + (byName[k]?.get(t.name)?.begin ?? 0)),
      outputOffset: encoded.header.dataStart + out.begin,
    });
    // Copies of sub-byte dtypes go whole; everything else in element blocks.
    const step = DTYPE_BITS[t.dtype] % 8 === 0 ? blockElements : Math.max(elements, 1);
    for (let start = 0; start < elements; start += step) {
      blocks.push({ tensor: index, start, count: Math.min(step, elements - start) });
    }
  });
  return {
    coefficients,
    copyFrom: copySources(coefficients),
    tensors,
    blocks,
    headerBytes: encoded.bytes,
    outputBytes: encoded.header.dataStart + encoded.header.dataBytes,
    shards: options.outputShards ? shardOutputs(outputLayout, options.outputShards, metadata ?? null) : null,
  };
}

function shardOutputs(
  tensors: TensorLayout[],
  shards: { name: string; tensorCount: number }[],
  metadata: Record<string, string> | null,
): OutputShard[] {
  let next = 0;
  return shards.map(({ name, tensorCount }) => {
    const own = tensors.slice(next, next + tensorCount);
    next += tensorCount;
    const { bytes, header } = encodeSafetensorsHeader(own, metadata);
    return {
      name,
      tensors: own.map((t) => t.name),
      headerBytes: bytes,
      bytes: header.dataStart + header.dataBytes,
    };
  });
}
