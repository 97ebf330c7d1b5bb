import { spawnSync } from "node:child_process";
import { createReadStream } from "node:fs";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runMerge } from "../src/merge/engine.js";
import { type BlockTask, mergeBlock } from "../src/merge/kernel.js";
import { mergeFiles } from "../src/merge/local.js";
import { type MergeMethod, mergeCoefficients, papa2Pairs, roundCoefficients } from "../src/merge/methods.js";
import { globMatcher, MergeInputError, planMerge } from "../src/merge/plan.js";
import { MergePool } from "../src/merge/pool.js";
import { parseSafetensorsHeader, SafetensorsValidator } from "../src/tensors/safetensors.js";
import { type ByteSource, readSafetensorsHeader } from "../src/tensors/source.js";
import { buildSafetensors, type TestTensor } from "./helpers/safetensors.js";

// ---- an independent reference: float encodings written from their definitions ----

/** Round-half-even of v to the float format with `mantissaBits` and minimum normal exponent `minExp`. */
function roundToFormat(v: number, mantissaBits: number, minExp: number): number {
  if (v === 0 || !Number.isFinite(v)) return v;
  const exponent = Math.max(Math.floor(Math.log2(Math.abs(v))), minExp);
  const quantum = 2 ** (exponent - mantissaBits);
  const scaled = v / quantum;
  const floor = Math.floor(scaled);
  const diff = scaled - floor;
  const rounded = diff > 0.5 || (diff === 0.5 && floor % 2 !== 0) ? floor + 1 : floor;
  return rounded * quantum;
}

/** The OCP definitions, code by code: sign, exponent field, mantissa field. */
const formats = {
  F8_E4M3: {
    e: 4,
    m: 3,
    bias: 7,
    special: (ef: number, mf: number) => (ef === 15 && mf === 7 ? "nan" : null),
  },
  F8_E5M2: {
    e: 5,
    m: 2,
    bias: 15,
    special: (ef: number, mf: number) => (ef === 31 ? (mf === 0 ? "inf" : "nan") : null),
  },
} as const;
type F8 = keyof typeof formats;

function f8Value(dtype: F8, code: number): number {
  const f = formats[dtype];
  const sign = code >> 7 ? -1 : 1;
  const ef = (code >> f.m) & ((1 << f.e) - 1);
  const mf = code & ((1 << f.m) - 1);
  const special = f.special(ef, mf);
  if (special === "nan") return Number.NaN;
  if (special === "inf") return sign * Infinity;
  if (ef === 0) return sign * mf * 2 ** (1 - f.bias - f.m);
  return sign * (1 + mf / 2 ** f.m) * 2 ** (ef - f.bias);
}

/**
 * The code nearest to v (ties to the even code), searched over every finite code; past the
 * largest finite value by half a step or more (to the even side on the tie), E4M3 gives NaN
 * and E5M2 infinity, as torch's casts do.
 */
function f8Code(dtype: F8, v: number): number {
  const sign = v < 0 || Object.is(v, -0) ? 0x80 : 0;
  const finite = Array.from({ length: 128 }, (_, c) => c).filter((c) => Number.isFinite(f8Value(dtype, c)));
  const maxCode = Math.max(...finite);
  const max = f8Value(dtype, maxCode);
  const step = max - f8Value(dtype, maxCode - 1);
  const a = Math.abs(v);
  if (a > max + step / 2 || (a === max + step / 2 && maxCode % 2 === 1)) {
    return dtype === "F8_E4M3" ? 0x7f : sign | 0x7c;
  }
  let best = 0;
  for (const c of finite) {
    const d = Math.abs(f8Value(dtype, c) - a) - Math.abs(f8Value(dtype, best) - a);
    if (d < 0 || (d === 0 && c % 2 === 0)) best = c;
  }
  return sign | best;
}

const isF8 = (dtype: string): dtype is F8 => dtype in formats;
const sizeOf = (dtype: string) => (dtype === "F64" ? 8 : dtype === "F32" ? 4 : isF8(dtype) ? 1 : 2);

function encodeRef(values: number[], dtype: string): Uint8Array {
  const out = Buffer.alloc(values.length * sizeOf(dtype));
  values.forEach((v, i) => {
    if (isF8(dtype)) out[i] = f8Code(dtype, v);
    else if (dtype === "F64") out.writeDoubleLE(v, i * 8);
    else if (dtype === "F32") out.writeFloatLE(v, i * 4);
    else if (dtype === "BF16")
      out.writeUInt16LE(
        Buffer.from(new Float32Array([roundToFormat(v, 7, -126)]).buffer).readUInt16LE(2),
        i * 2,
      );
    else {
      const r = roundToFormat(v, 10, -14);
      out.writeUInt16LE(halfBits(Math.abs(r) > 65504 ? Math.sign(r) * Number.POSITIVE_INFINITY : r), i * 2);
    }
  });
  return out;
}

/** Bits of a value already representable as float16. */
function halfBits(v: number): number {
  const sign = v < 0 || Object.is(v, -0) ? 0x8000 : 0;
  const a = Math.abs(v);
  if (a === 0) return sign;
  if (a === Number.POSITIVE_INFINITY) return sign | 0x7c00;
  if (a < 2 ** -14) return sign | Math.round(a / 2 ** -24);
  const e = Math.floor(Math.log2(a));
  return sign | ((e + 15) << 10) | Math.round((a / 2 ** e - 1) * 1024);
}

function decodeRef(bytes: Buffer, dtype: string): number[] {
  return Array.from({ length: bytes.length / sizeOf(dtype) }, (_, i) => {
    if (isF8(dtype)) return f8Value(dtype, bytes[i] as number);
    if (dtype === "F64") return bytes.readDoubleLE(i * 8);
    if (dtype === "F32") return bytes.readFloatLE(i * 4);
    const h = bytes.readUInt16LE(i * 2);
    if (dtype === "BF16") return new Float32Array(new Uint32Array([h << 16]).buffer)[0] as number;
    const e = (h >> 10) & 0x1f;
    const m = h & 0x3ff;
    const s = h & 0x8000 ? -1 : 1;
    if (e === 31) return m ? Number.NaN : s * Number.POSITIVE_INFINITY;
    return e === 0 ? s * m * 2 ** -24 : s * (1 + m / 1024) * 2 ** (e - 15);
  });
}

/** Reads a merged file back: tensors by name, after checking it with the strict validator. */
async function readMerged(
  path: string,
): Promise<Map<string, { dtype: string; shape: number[]; values: number[]; raw: Buffer }>> {
  const validator = new SafetensorsValidator();
  await pipeline(createReadStream(path), validator, new Writable({ write: (_c, _e, cb) => cb() }));
  const bytes = await readFile(path);
  const header = parseSafetensorsHeader(bytes.subarray(8, 8 + Number(bytes.readBigUInt64LE(0))));
  return new Map(
    header.tensors.map((t) => {
      const raw = bytes.subarray(header.dataStart + t.begin, header.dataStart + t.end);
      const float = ["F64", "F32", "F16", "BF16"].includes(t.dtype) || isF8(t.dtype);
      return [t.name, { dtype: t.dtype, shape: t.shape, raw, values: float ? decodeRef(raw, t.dtype) : [] }];
    }),
  );
}

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "papa-merge-"));
});
afterAll(() => rm(dir, { recursive: true, force: true }));

/** Input k: w = [k+1, -2(k+1), 0.5k, 3], plus an int64 counter 100+k. All exact in every float dtype. */
const weights = (k: number) => [k + 1, -2 * (k + 1), 0.5 * k, 3];
async function writeInputs(
  n: number,
  dtype: string,
  extra: (k: number) => TestTensor[] = () => [],
): Promise<string[]> {
  const paths: string[] = [];
  for (let k = 0; k < n; k++) {
    const path = join(dir, `${dtype}-${n}-${k}-${Math.random().toString(36).slice(2)}.safetensors`);
    const counter = Buffer.alloc(8);
    counter.writeBigInt64LE(BigInt(100 + k));
    await writeFile(
      path,
      buildSafetensors([
        { name: "layer.weight", dtype, shape: [2, 2], data: encodeRef(weights(k), dtype) },
        { name: "bn.num_batches_tracked", dtype: "I64", shape: [], data: counter },
        ...extra(k),
      ]),
    );
    paths.push(path);
  }
  return paths;
}

/** The expected outputs: sum_k c[j][k] * weights(k), written out by hand from each method's definition. */
function expected(spec: MergeMethod, n: number): number[][] {
  const w = Array.from({ length: n }, (_, k) => weights(k));
  const combine = (c: number[]) =>
    [0, 1, 2, 3].map((i) => c.reduce((s, ck, k) => s + ck * (w[k]?.[i] ?? 0), 0));
  switch (spec.method) {
    case "papa-all":
      return [combine(Array(n).fill(1 / n))];
    case "weighted":
      return [combine(spec.coefficients)];
    case "papa-pull":
      return w.map((wj) => {
        const mean = combine(Array(n).fill(1 / n));
        return wj.map((x, i) => (1 - spec.beta) * x + spec.beta * (mean[i] ?? 0));
      });
    case "papa-2":
      return papa2Pairs(n, spec.seed).map(([a, b]) =>
        (w[a] ?? []).map((x, i) => 0.5 * x + 0.5 * (w[b]?.[i] ?? 0)),
      );
  }
}

/** The input output j's integers come from: its first parent (papa-2), itself (papa-pull), the heaviest. */
function copiedFrom(spec: MergeMethod, j: number): bigint {
  if (spec.method === "papa-2") return BigInt(Math.min(...(papa2Pairs(4, spec.seed)[j] ?? [])));
  return BigInt(spec.method === "papa-pull" ? j : 0);
}

describe("merge methods", () => {
  it.each([
    [{ method: "papa-all" } as MergeMethod],
    [{ method: "papa-2", seed: 7 } as MergeMethod],
    [{ method: "weighted", coefficients: [0.1, 0.2, 0.3, 0.4] } as MergeMethod],
    [{ method: "papa-pull", beta: 0.25 } as MergeMethod],
  ])("%j: every output's coefficients sum to 1", (spec) => {
    for (const row of mergeCoefficients(spec, 4)) {
      expect(row.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 12);
      expect(row.every((c) => c >= 0)).toBe(true);
    }
  });

  it("papa-pull moves each input beta toward the mean", () => {
    const rows = mergeCoefficients({ method: "papa-pull", beta: 0.2 }, 4);
    for (const [k, c] of [0.05, 0.85, 0.05, 0.05].entries()) expect(rows[1]?.[k]).toBeCloseTo(c, 15);
  });

  it.each([2, 3, 4, 5, 8])(
    "papa-2 of %i: distinct pairs for every seed, every pair equally likely, in every slot",
    (n) => {
      const pairs = (n * (n - 1)) / 2;
      const seeds = 4000;
      const counts = new Map<string, number>();
      const slotCounts = new Map<string, number>();
      for (let seed = 0; seed < seeds; seed++) {
        const drawn = papa2Pairs(n, seed).map(([a, b]) => {
          expect(a).toBeLessThan(b);
          expect(b).toBeLessThan(n);
          return `${a}-${b}`;
        });
        expect(drawn).toHaveLength(n);
        // Two inputs have one pair; otherwise no two children are the same average.
        expect(new Set(drawn).size).toBe(Math.min(n, pairs));
        for (const [slot, pair] of drawn.entries()) {
          counts.set(pair, (counts.get(pair) ?? 0) + 1);
          if (slot === 0) slotCounts.set(pair, (slotCounts.get(pair) ?? 0) + 1);
        }
      }
      expect(counts.size).toBe(pairs);
      const each = (seeds * n) / pairs;
      for (const c of counts.values()) expect(Math.abs(c - each) / each).toBeLessThan(0.08);
      // The first slot is not biased toward the first pairs in lexicographic order.
      for (const c of slotCounts.values())
        expect(Math.abs(c - seeds / pairs) / (seeds / pairs)).toBeLessThan(0.25);
      expect(papa2Pairs(n, 3)).toEqual(papa2Pairs(n, 3));
    },
  );

  it("a population round: submitters by the method, the member that did not submit the mean", () => {
    const third = 1 / 3;
    const mean = [third, third, third];
    const seed = 5;
    // Members 0, 2 and 3 of 4 submitted (submissions 0, 1, 2).
    const papa = roundCoefficients({ method: "papa", alpha: 0.7, seed }, 4, [0, 2, 3]);
    expect(papa[1]).toEqual(mean);
    for (const [j, k] of [
      [0, 0],
      [2, 1],
      [3, 2],
    ] as const) {
      for (const i of [0, 1, 2]) expect(papa[j]?.[i]).toBeCloseTo(0.1 + (i === k ? 0.7 : 0), 15);
    }
    expect(roundCoefficients({ method: "papa-all", alpha: 0.7, seed }, 4, [0, 2, 3])).toEqual([
      mean,
      mean,
      mean,
      mean,
    ]);
    const papa2 = roundCoefficients({ method: "papa-2", alpha: 0.7, seed }, 4, [0, 2, 3]);
    expect(papa2[1]).toEqual(mean);
    const pairs = [papa2[0], papa2[2], papa2[3]].map((row) => row?.map((c) => (c === 0.5 ? 1 : 0)).join(""));
    expect(new Set(pairs)).toEqual(new Set(["110", "101", "011"]));
    expect(papa2.filter((_, j) => j !== 1)).toEqual(
      papa2Pairs(3, seed).map(([a, b]) => [0, 1, 2].map((i) => (i === a || i === b ? 0.5 : 0))),
    );
    // One submission is everyone's next weights.
    expect(roundCoefficients({ method: "papa-2", alpha: 0.7, seed }, 3, [1])).toEqual([[1], [1], [1]]);
  });

  it.each([
    [{ method: "weighted", coefficients: [0.5, 0.6] }, "sum to 1"],
    [{ method: "weighted", coefficients: [1] }, "one coefficient per input"],
    [{ method: "weighted", coefficients: [Number.NaN, 1] }, "finite"],
    [{ method: "papa-pull", beta: 0 }, "beta"],
    [{ method: "papa-pull", beta: 1.5 }, "beta"],
  ] as [MergeMethod, string][])("rejects %j", (spec, message) => {
    expect(() => mergeCoefficients(spec, 2)).toThrow(message);
  });
});

describe("8-bit floats", () => {
  const codes = Uint8Array.from({ length: 256 }, (_, c) => c);

  function merge(dtype: F8, outDtype: "F8_E4M3" | "F8_E5M2" | "F32", inputs: Uint8Array[], row: number[]) {
    const count = inputs[0]?.length ?? 0;
    const out = new Uint8Array(count * (outDtype === "F32" ? 4 : 1));
    mergeBlock({ dtype, outDtype, count, inputs, outputs: [out], coefficients: [row] });
    return out;
  }

  it.each(["F8_E4M3", "F8_E5M2"] as const)("%s: every one of the 256 codes decodes exactly", (dtype) => {
    const out = merge(dtype, "F32", [codes], [1]);
    const decoded = new Float32Array(out.buffer);
    // Object.is: NaN is NaN, and -0 is not 0.
    for (let c = 0; c < 256; c++) expect(Object.is(decoded[c], f8Value(dtype, c))).toBe(true);
  });

  it.each(["F8_E4M3", "F8_E5M2"] as const)(
    "%s: the average of every pair of the 256 codes rounds to the nearest code, ties to even",
    (dtype) => {
      const a = new Uint8Array(65536);
      const b = new Uint8Array(65536);
      for (let i = 0; i < 65536; i++) [a[i], b[i]] = [i >> 8, i & 255];
      const out = merge(dtype, dtype, [a, b], [0.5, 0.5]);
      const wrong: string[] = [];
      for (let i = 0; i < 65536; i++) {
        const exact = 0.5 * f8Value(dtype, i >> 8) + 0.5 * f8Value(dtype, i & 255);
        const got = out[i] as number;
        const right = Number.isNaN(exact) ? Number.isNaN(f8Value(dtype, got)) : got === f8Code(dtype, exact);
        if (!right) wrong.push(`${i >> 8} & ${i & 255} -> ${got}`);
      }
      expect(wrong).toEqual([]);
    },
  );

  it.each([
    ["F8_E4M3", 448, Number.NaN], // 448 * 2 - (-448) = 1344: no infinity in E4M3
    ["F8_E5M2", 57344, Infinity],
  ] as const)(
    "%s: a combination past the largest value (%d) saturates as torch's cast does",
    (dtype, max, want) => {
      const big = f8Code(dtype, max);
      const out = merge(dtype, dtype, [Uint8Array.of(big), Uint8Array.of(big | 0x80)], [2, -1]);
      expect(f8Value(dtype, out[0] as number)).toBe(want);
      // Just under half a step past the largest value still rounds to it.
      const near = merge(dtype, dtype, [Uint8Array.of(big)], [1.03]);
      expect(f8Value(dtype, near[0] as number)).toBe(max);
    },
  );
});

describe("exclude patterns", () => {
  /** The definition, as a regular expression: fine for the short names it is compared on here. */
  const reference = (pattern: string, name: string) =>
    new RegExp(
      `^${pattern
        .split("*")
        .map((p) => p.replace(/[.+?^${}()|[\]\\]/g, "\\$&"))
        .join(".*")}$`,
    ).test(name);

  it("match as `*`-globs do, on every small case", () => {
    const words = (length: number): string[] =>
      length === 0 ? [""] : words(length - 1).flatMap((w) => [`${w}a`, `${w}b`, `${w}.`]);
    const names = [0, 1, 2, 3, 4].flatMap(words);
    const patterns = [0, 1, 2, 3].flatMap(words).flatMap((w) => [w, `*${w}`, `${w}*`, `*${w}*`]);
    patterns.push("a*b", "*a*a*", "a**b", "*.*", "a*a*a", "**", "*");
    let checked = 0;
    for (const pattern of patterns) {
      const matches = globMatcher(pattern);
      for (const name of names) {
        expect(matches(name), `${pattern} ~ ${name}`).toBe(reference(pattern, name));
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(20_000);
  });

  it("never backtrack: a pattern that made a regular expression take minutes answers at once", () => {
    const started = performance.now();
    const matches = globMatcher("*a*a*a*a*a*a*a*a*a*ab");
    expect(matches("a".repeat(4000))).toBe(false);
    expect(matches(`${"a".repeat(4000)}b`)).toBe(true);
    expect(performance.now() - started).toBeLessThan(1000);
  });
});

describe("merge engine on files", () => {
  const specs: MergeMethod[] = [
    { method: "papa-all" },
    { method: "papa-2", seed: 11 },
    { method: "weighted", coefficients: [0.5, 0.25, 0.125, 0.125] },
    { method: "papa-pull", beta: 0.5 },
  ];
  for (const dtype of ["F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2"]) {
    it.each(specs)(
      `$method on ${dtype} matches the closed form, integers copied from each output's own input`,
      async (spec) => {
        const inputs = await writeInputs(4, dtype);
        const paths = await mergeFiles({
          inputs,
          out: join(dir, `out-${dtype}-${spec.method}.safetensors`),
          spec,
          threads: 2,
        });
        const want = expected(spec, 4);
        expect(paths).toHaveLength(want.length);
        for (const [j, path] of paths.entries()) {
          const merged = await readMerged(path);
          const w = merged.get("layer.weight");
          expect(w?.dtype).toBe(dtype);
          expect(w?.shape).toEqual([2, 2]);
          expect(w?.values).toEqual(decodeRef(Buffer.from(encodeRef(want[j] ?? [], dtype)), dtype));
          expect(merged.get("bn.num_batches_tracked")?.raw.readBigInt64LE(0)).toBe(
            100n + copiedFrom(spec, j),
          );
        }
      },
    );
  }

  it("sums F16 inputs wider than float16: 2048 and three 1.5 average to 513, not 513.5", async () => {
    // Accumulated in float16 (a step of 2 at 2048, 0.5 at 512), any order of the sum gives 513.5;
    // the exact mean 513.125 rounds once to 513.
    const inputs = await writeInputs(4, "F16", (k) => [
      { name: "x", dtype: "F16", shape: [1], data: encodeRef([k === 0 ? 2048 : 1.5], "F16") },
    ]);
    const [path] = await mergeFiles({
      inputs,
      out: join(dir, "wide.safetensors"),
      spec: { method: "papa-all" },
    });
    expect((await readMerged(path ?? "")).get("x")?.values).toEqual([513]);
  });

  it("narrows to the output dtype with round-to-nearest-even", async () => {
    // 1 + 2^-11 lies halfway between two float16 values; 1 + 3 * 2^-11 too: ties go to even.
    const values = [1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8 + 2 ** -9, 70000, -3.3, 1e-6];
    const make = async (scale: number) => {
      const path = join(dir, `round-${scale}.safetensors`);
      await writeFile(
        path,
        buildSafetensors([
          {
            name: "x",
            dtype: "F32",
            shape: [6],
            data: encodeRef(
              values.map((v) => v * scale),
              "F32",
            ),
          },
        ]),
      );
      return path;
    };
    const inputs = [await make(1), await make(1)];
    for (const outputDtype of ["F16", "BF16"] as const) {
      const [path] = await mergeFiles({
        inputs,
        out: join(dir, `round-${outputDtype}.safetensors`),
        spec: { method: "papa-all" },
        outputDtype,
      });
      const x = (await readMerged(path ?? "")).get("x");
      expect(x?.dtype).toBe(outputDtype);
      const f32 = values.map((v) => Math.fround(v));
      expect(x?.raw.equals(Buffer.from(encodeRef(f32, outputDtype)))).toBe(true);
    }
    const [f16] = await mergeFiles({
      inputs,
      out: join(dir, "round-ties.safetensors"),
      spec: { method: "papa-all" },
      outputDtype: "F16",
    });
    const ties = (await readMerged(f16 ?? "")).get("x")?.values;
    expect(ties?.slice(0, 2)).toEqual([1, 1 + 2 * 2 ** -10]);
    expect(ties?.[3]).toBe(Number.POSITIVE_INFINITY);
  });

  it("streams tensors larger than a block, on threads and inline alike", async () => {
    const n = 300_000;
    const make = async (k: number) => {
      const path = join(dir, `big-${k}.safetensors`);
      const values = Array.from({ length: n }, (_, i) => ((i % 1000) - 500) / 8 + k);
      await writeFile(
        path,
        buildSafetensors([{ name: "big", dtype: "F16", shape: [n], data: encodeRef(values, "F16") }]),
      );
      return path;
    };
    const inputs = [await make(0), await make(2)];
    const want = Array.from({ length: n }, (_, i) => ((i % 1000) - 500) / 8 + 1);
    for (const threads of [0, 2]) {
      const [path] = await mergeFiles({
        inputs,
        out: join(dir, `big-out-${threads}.safetensors`),
        spec: { method: "papa-all" },
        threads,
      });
      expect((await readMerged(path ?? "")).get("big")?.values).toEqual(want);
    }
  });

  it("copies excluded tensors from the first input without comparing them", async () => {
    const inputs = await writeInputs(2, "F32", (k) => [
      { name: "head.weight", dtype: "F32", shape: [k + 1], data: encodeRef(Array(k + 1).fill(k + 7), "F32") },
    ]);
    const [path] = await mergeFiles({
      inputs,
      out: join(dir, "excluded.safetensors"),
      spec: { method: "papa-all" },
      exclude: ["head.*"],
    });
    const merged = await readMerged(path ?? "");
    expect(merged.get("head.weight")?.values).toEqual([7]);
    expect(merged.get("layer.weight")?.values).toEqual([1.5, -3, 0.25, 3]);
  });

  it("accounts for the time it reads, merges on its threads and writes; a merge of excluded tensors only merges nothing", async () => {
    const inputs = await writeInputs(2, "F32");
    const merging = { readMs: 0, mergeMs: 0, writeMs: 0 };
    await mergeFiles({
      inputs,
      out: join(dir, "timed.safetensors"),
      spec: { method: "papa-all" },
      stages: merging,
    });
    expect(merging.readMs).toBeGreaterThan(0);
    expect(merging.mergeMs).toBeGreaterThan(0);
    expect(merging.writeMs).toBeGreaterThan(0);
    const copying = { readMs: 0, mergeMs: 0, writeMs: 0 };
    await mergeFiles({
      inputs,
      out: join(dir, "copied.safetensors"),
      spec: { method: "papa-all" },
      exclude: ["*"],
      stages: copying,
    });
    expect(copying.readMs).toBeGreaterThan(0);
    expect(copying.mergeMs).toBe(0);
    expect(copying.writeMs).toBeGreaterThan(0);
  });

  it.each([
    [
      "a different shape",
      { name: "extra", dtype: "F32", shape: [2] },
      { name: "extra", dtype: "F32", shape: [3] },
      'tensor "extra" has shape',
    ],
    [
      "a different dtype",
      { name: "extra", dtype: "F32", shape: [2] },
      { name: "extra", dtype: "F16", shape: [2] },
      'tensor "extra" is F32',
    ],
    ["a missing tensor", { name: "extra", dtype: "F32", shape: [2] }, null, 'tensor "extra" is in'],
    ["an extra tensor", null, { name: "extra", dtype: "F32", shape: [2] }, 'tensor "extra" is in'],
  ] as const)("refuses inputs with %s, naming the tensor, leaving no file", async (_case, a, b, message) => {
    const tensor = (t: { name: string; dtype: string; shape: readonly number[] } | null): TestTensor[] =>
      t
        ? [
            {
              name: t.name,
              dtype: t.dtype,
              shape: [...t.shape],
              data: encodeRef(Array(t.shape[0]).fill(1), t.dtype),
            },
          ]
        : [];
    const inputs = await writeInputs(2, "F32", (k) => tensor(k === 0 ? a : b));
    const out = join(dir, "mismatch", "never.safetensors");
    await rm(join(dir, "mismatch"), { recursive: true, force: true });
    await import("node:fs/promises").then((fs) => fs.mkdir(join(dir, "mismatch")));
    const err = await mergeFiles({ inputs, out, spec: { method: "papa-all" } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MergeInputError);
    expect((err as Error).message).toContain(message);
    expect(await readdir(join(dir, "mismatch"))).toEqual([]);
  });

  it.each([
    ["F8_E8M0", 4],
    ["F4", 2],
    ["F6_E2M3", 3],
    ["F6_E3M2", 3],
    ["C64", 32],
  ] as const)(
    "refuses to average %s, naming the tensor and dtype; copies it when excluded",
    async (dtype, bytes) => {
      const inputs = await writeInputs(2, "F32", (k) => [
        { name: "scales", dtype, shape: [4], data: Buffer.alloc(bytes, 0x11 * (k + 1)) },
      ]);
      const out = join(dir, `refused-${dtype}.safetensors`);
      const err = await mergeFiles({ inputs, out, spec: { method: "papa-all" } }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(MergeInputError);
      expect((err as MergeInputError).tensor).toBe("scales");
      expect((err as Error).message).toContain(`tensor "scales" is ${dtype}, which cannot be averaged`);
      await expect(readFile(out)).rejects.toThrow("ENOENT");

      const [path] = await mergeFiles({ inputs, out, spec: { method: "papa-all" }, exclude: ["scales"] });
      expect((await readMerged(path ?? "")).get("scales")?.raw).toEqual(Buffer.alloc(bytes, 0x11));
    },
  );
});

describe("merge threads", () => {
  const task = (count: number): BlockTask => {
    const shared = (bytes: number) => new Uint8Array(new SharedArrayBuffer(bytes));
    const inputs = [shared(count * 4), shared(count * 4)];
    new Float32Array(inputs[0]?.buffer as SharedArrayBuffer).fill(1);
    new Float32Array(inputs[1]?.buffer as SharedArrayBuffer).fill(3);
    return {
      dtype: "F32",
      outDtype: "F32",
      count,
      inputs,
      outputs: [shared(count * 4)],
      coefficients: [[0.5, 0.5]],
    };
  };

  it("replace a thread that dies: the task it held fails, the pool keeps its size, later tasks run", async () => {
    const pool = new MergePool(2);
    try {
      const held = pool.run(task(1 << 24)).catch((err: unknown) => err);
      await Promise.all(pool.threads.map((t) => t.terminate()));
      expect(String(await held)).toContain("a merge thread exited");
      const later = Array.from({ length: 6 }, () => task(1024));
      await Promise.all(later.map((t) => pool.run(t)));
      for (const t of later)
        expect(new Float32Array(t.outputs[0]?.buffer as SharedArrayBuffer)[1023]).toBe(2);
      expect(pool.threads).toHaveLength(2);
    } finally {
      await pool.close();
    }
  });
});

describe("merge memory", () => {
  const ELEMENTS = 300_000; // five blocks of 64 Ki elements

  /** Averages two one-tensor inputs filled with `base` and `base + 1` on `pool`; a read after the first `failAfter` fails. */
  async function averageOf(
    pool: MergePool,
    base: number,
    failAfter = Number.POSITIVE_INFINITY,
  ): Promise<Float32Array> {
    const files = [base, base + 1].map((v) =>
      buildSafetensors([
        {
          name: "w",
          dtype: "F32",
          shape: [ELEMENTS],
          data: Buffer.from(new Float32Array(ELEMENTS).fill(v).buffer),
        },
      ]),
    );
    let reads = Number.NEGATIVE_INFINITY; // counted from the merge on, not the headers' reads
    const sources: ByteSource[] = files.map((file) => ({
      size: file.length,
      read: async (offset, target) => {
        if (++reads > failAfter) throw new Error("the store went away");
        target.set(file.subarray(offset, offset + target.byteLength));
      },
      close: async () => undefined,
    }));
    const headers = await Promise.all(sources.map((source) => readSafetensorsHeader(source, 1 << 20)));
    reads = 0;
    const plan = planMerge({
      headers,
      coefficients: [[0.5, 0.5]],
      labels: ["a", "b"],
      blockElements: 1 << 16,
    });
    const chunks: Buffer[] = [];
    const sink = { write: async (data: Uint8Array) => void chunks.push(Buffer.from(data)) };
    await runMerge({ plan, sources, sinks: [sink], pool });
    const out = Buffer.concat(chunks);
    const data = out.subarray(out.length - ELEMENTS * 4);
    return new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.length));
  }

  it("reuses a merge's shared memory for the next merge on the pool, never memory a failed merge may still touch", async () => {
    const pool = new MergePool(2);
    const borrowed: SharedArrayBuffer[] = [];
    const borrow = pool.borrowMemory.bind(pool);
    pool.borrowMemory = (bytes) => {
      const memory = borrow(bytes);
      borrowed.push(memory);
      return memory;
    };
    try {
      expect(new Set(await averageOf(pool, 0))).toEqual(new Set([0.5]));
      expect(new Set(await averageOf(pool, 10))).toEqual(new Set([10.5]));
      expect(borrowed[1]).toBe(borrowed[0]);
      await expect(averageOf(pool, 20, 3)).rejects.toThrow("the store went away");
      expect(borrowed[2]).toBe(borrowed[0]);
      expect(new Set(await averageOf(pool, 30))).toEqual(new Set([30.5]));
      expect(borrowed[3]).not.toBe(borrowed[2]);
    } finally {
      await pool.close();
    }
  });
});

describe("papa merge (the CLI)", () => {
  const cli = (args: string[]) =>
    spawnSync(process.execPath, ["--import", "tsx", "src/cli.ts", ...args], { encoding: "utf8" });

  it("merges local files", async () => {
    const inputs = await writeInputs(3, "F32");
    const out = join(dir, "cli.safetensors");
    const run = cli([
      "merge",
      "--method",
      "weighted",
      "--coefficients",
      "0.5,0.25,0.25",
      "--out",
      out,
      ...inputs,
    ]);
    expect(run.stderr).toBe("");
    expect(run.status).toBe(0);
    expect(run.stdout).toContain(out);
    expect((await readMerged(out)).get("layer.weight")?.values).toEqual([1.75, -3.5, 0.375, 3]);
  });

  it("exits 2 on a bad command line and 1 when the merge fails", async () => {
    expect(cli(["merge", "--method", "papa-all"]).status).toBe(2);
    expect(cli(["frobnicate"]).status).toBe(2);
    const run = cli([
      "merge",
      "--method",
      "papa-all",
      "--out",
      join(dir, "x.safetensors"),
      join(dir, "missing.safetensors"),
      join(dir, "missing2.safetensors"),
    ]);
    expect(run.status).toBe(1);
    expect(run.stderr).toContain("missing.safetensors");
  });
});
