/** Test-side safetensors writer, independent of the service's code. */
export interface TestTensor {
  name: string;
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

/** A file from an explicit header text and data section (for malformed cases). */
export function rawSafetensors(headerText: string, data: Uint8Array = new Uint8Array(0)): Buffer {
  const header = Buffer.from(headerText, "utf8");
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(header.length));
  return Buffer.concat([prefix, header, data]);
}

/** A valid file: tensors laid out in order, header padded with spaces to 8 bytes. */
export function buildSafetensors(tensors: TestTensor[], metadata?: Record<string, string>): Buffer {
  const header: Record<string, unknown> = metadata ? { __metadata__: metadata } : {};
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.length] };
    offset += t.data.length;
  }
  let text = JSON.stringify(header);
  text += " ".repeat((8 - (text.length % 8)) % 8);
  return rawSafetensors(text, Buffer.concat(tensors.map((t) => t.data)));
}

export function f32(values: number[]): Uint8Array {
  return new Uint8Array(new Float32Array(values).buffer);
}

/** A small valid checkpoint: a 2x3 F32 weight, a 3-element F32 bias and an I64 counter. */
export function smallCheckpoint(seed = 1): Buffer {
  const counter = new Uint8Array(new BigInt64Array([BigInt(1000 + seed)]).buffer);
  return buildSafetensors(
    [
      { name: "fc.weight", dtype: "F32", shape: [2, 3], data: f32([1, 2, 3, 4, 5, 6].map((v) => v * seed)) },
      { name: "fc.bias", dtype: "F32", shape: [3], data: f32([0.5, -0.5, seed]) },
      { name: "bn.num_batches_tracked", dtype: "I64", shape: [], data: counter },
    ],
    { format: "pt", seed: String(seed) },
  );
}
