/**
 * Float conversions between the storage dtypes and float32, with round-to-nearest-even when
 * narrowing (NaN stays NaN, overflow becomes infinity), as numpy and torch do.
 */
export type FloatDtype = "F16" | "BF16" | "F32" | "F64";

export function isFloatDtype(dtype: string): dtype is FloatDtype {
  return dtype === "F16" || dtype === "BF16" || dtype === "F32" || dtype === "F64";
}

export const FLOAT_BYTES: Record<FloatDtype, number> = { F16: 2, BF16: 2, F32: 4, F64: 8 };

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

let f16Table: Float32Array | null = null;

/** float16 bits -> float32, every one of the 65536 values precomputed. */
function halfTable(): Float32Array {
  if (f16Table) return f16Table;
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 0x1f;
    const mantissa = h & 0x3ff;
    if (exponent === 0) table[h] = sign * mantissa * 2 ** -24;
    else if (exponent === 31) table[h] = mantissa ? Number.NaN : sign * Number.POSITIVE_INFINITY;
    else table[h] = sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
  }
  f16Table = table;
  return table;
}

/** float32 -> float16 bits, round to nearest even. */
export function toHalfBits(value: number): number {
  f32[0] = value;
  const x = u32[0] ?? 0;
  const sign = (x >>> 16) & 0x8000;
  const exponent = (x >>> 23) & 0xff;
  const mantissa = x & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa ? 0x200 : 0); // inf or NaN
  const e = exponent - 127 + 15;
  if (e >= 31) return sign | 0x7c00; // overflow
  if (e <= 0) {
    if (e < -10) return sign; // underflow to zero
    const m = mantissa | 0x800000; // implicit bit
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = m & ((1 << shift) - 1);
    let out = m >>> shift;
    if (rest > half || (rest === half && out & 1)) out++;
    return sign | out;
  }
  let out = (e << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && out & 1)) out++; // may carry into the exponent: correct
  return sign | out;
}

/** float32 -> bfloat16 bits, round to nearest even. */
export function toBfloatBits(value: number): number {
  f32[0] = value;
  const x = u32[0] ?? 0;
  if ((x & 0x7f800000) === 0x7f800000 && x & 0x7fffff) return ((x >>> 16) | 0x40) & 0xffff; // quiet NaN
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

/** Decodes `bytes` of `dtype` into `out` (float32, or float64 for F64). */
export function decodeFloats(bytes: Uint8Array, dtype: FloatDtype, out: Float32Array | Float64Array): void {
  const n = out.length;
  switch (dtype) {
    case "F32":
      out.set(new Float32Array(bytes.buffer, bytes.byteOffset, n));
      return;
    case "F64":
      out.set(new Float64Array(bytes.buffer, bytes.byteOffset, n));
      return;
    case "F16": {
      const table = halfTable();
      const h = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      for (let i = 0; i < n; i++) out[i] = table[h[i] as number] as number;
      return;
    }
    case "BF16": {
      const h = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      const wide = new Uint32Array(n);
      for (let i = 0; i < n; i++) wide[i] = (h[i] as number) << 16;
      out.set(new Float32Array(wide.buffer));
      return;
    }
  }
}

/** Encodes float values as `dtype` bytes into `target` (at least values.length x dtype size bytes). */
export function encodeFloatsInto(
  values: Float32Array | Float64Array,
  dtype: FloatDtype,
  target: Uint8Array,
): void {
  const n = values.length;
  switch (dtype) {
    case "F32":
      new Float32Array(target.buffer, target.byteOffset, n).set(values);
      return;
    case "F64":
      new Float64Array(target.buffer, target.byteOffset, n).set(values);
      return;
    case "F16": {
      const out = new Uint16Array(target.buffer, target.byteOffset, n);
      for (let i = 0; i < n; i++) out[i] = toHalfBits(values[i] as number);
      return;
    }
    case "BF16": {
      const out = new Uint16Array(target.buffer, target.byteOffset, n);
      for (let i = 0; i < n; i++) out[i] = toBfloatBits(values[i] as number);
      return;
    }
  }
}
