/**
 * Float conversions between the storage dtypes and float32, with round-to-nearest-even when
 * narrowing (NaN stays NaN), as numpy, torch and ml_dtypes do. Overflow becomes infinity, except
 * in F8_E4M3 (the "fn" format: no infinities), where it becomes NaN, as torch's
 * `.to(torch.float8_e4m3fn)` does.
 */
export type FloatDtype = "F16" | "BF16" | "F32" | "F64" | "F8_E4M3" | "F8_E5M2";

export const FLOAT_BYTES: Record<FloatDtype, number> = {
  F16: 2,
  BF16: 2,
  F32: 4,
  F64: 8,
  F8_E4M3: 1,
  F8_E5M2: 1,
};

export function isFloatDtype(dtype: string): dtype is FloatDtype {
  return Object.hasOwn(FLOAT_BYTES, dtype);
}

/** An 8-bit float format: exponent bias, mantissa bits, and what its top codes mean. */
interface Minifloat {
  bias: number;
  mantissaBits: number;
  /** The largest finite code (sign bit clear). */
  maxCode: number;
  /** What a magnitude past `maxCode` becomes: NaN (E4M3) or infinity (E5M2). */
  overflow: number;
  /** The code of +infinity, if the format has one. */
  infinity: number | null;
  nan: number;
}

const MINIFLOATS: Record<"F8_E4M3" | "F8_E5M2", Minifloat> = {
  // OCP E4M3 ("e4m3fn"): no infinities, S.1111.111 is NaN, the largest value 448.
  F8_E4M3: { bias: 7, mantissaBits: 3, maxCode: 0x7e, overflow: 0x7f, infinity: null, nan: 0x7f },
  // OCP E5M2: IEEE-like, S.11111.00 is infinity, S.11111.xx NaN, the largest value 57344.
  F8_E5M2: { bias: 15, mantissaBits: 2, maxCode: 0x7b, overflow: 0x7c, infinity: 0x7c, nan: 0x7f },
};

const minifloatTables = new Map<Minifloat, Float32Array>();

/** Every one of a minifloat's 256 codes decoded (exactly: float32 holds each of them). */
function minifloatTable(format: Minifloat): Float32Array {
  const cached = minifloatTables.get(format);
  if (cached) return cached;
  const { bias, mantissaBits } = format;
  const table = new Float32Array(256);
  for (let code = 0; code < 256; code++) {
    const sign = code & 0x80 ? -1 : 1;
    const magnitude = code & 0x7f;
    const exponent = magnitude >> mantissaBits;
    const mantissa = magnitude & ((1 << mantissaBits) - 1);
    const unit = 2 ** mantissaBits;
    if (magnitude > format.maxCode)
      table[code] = magnitude === format.infinity ? sign * Infinity : Number.NaN;
    else if (exponent === 0) table[code] = sign * (mantissa / unit) * 2 ** (1 - bias);
    else table[code] = sign * (1 + mantissa / unit) * 2 ** (exponent - bias);
  }
  minifloatTables.set(format, table);
  return table;
}

/** q rounded to the nearest integer, ties to even. */
function roundHalfEven(q: number): number {
  const floor = Math.floor(q);
  const rest = q - floor;
  if (rest > 0.5) return floor + 1;
  if (rest < 0.5) return floor;
  return floor + (floor % 2);
}

/**
 * A number -> a minifloat code, round to nearest even. The magnitude is scaled by a power of two
 * (exact) to a count of its binade's steps (2^m to 2^(m+1) for normals, the implicit bit
 * included; below 2^m for subnormals) and rounded once; codes are consecutive, so a rounding
 * that carries past a binade's last mantissa lands on the next binade's first code.
 */
function toMinifloatBits(value: number, format: Minifloat): number {
  if (Number.isNaN(value)) return format.nan;
  const sign = value < 0 || Object.is(value, -0) ? 0x80 : 0;
  const magnitude = Math.abs(value);
  if (magnitude === Infinity) return sign | format.overflow;
  if (magnitude === 0) return sign;
  const { bias, mantissaBits } = format;
  let exponent = Math.floor(Math.log2(magnitude));
  if (2 ** exponent > magnitude) exponent--; // Math.log2 may round up
  if (2 ** (exponent + 1) <= magnitude) exponent++; // or down
  exponent = Math.max(1 - bias, exponent); // subnormals: the smallest exponent, field 0
  const steps = roundHalfEven(magnitude / 2 ** (exponent - mantissaBits));
  const code = ((exponent + bias - 1) << mantissaBits) + steps;
  return sign | (code > format.maxCode ? format.overflow : code);
}

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
    default: {
      const table = minifloatTable(MINIFLOATS[dtype]);
      for (let i = 0; i < n; i++) out[i] = table[bytes[i] as number] as number;
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
    default: {
      const format = MINIFLOATS[dtype];
      for (let i = 0; i < n; i++) target[i] = toMinifloatBits(values[i] as number, format);
    }
  }
}
