import type { Harness } from "./harness.js";
import { buildSafetensors, f32, type TestTensor } from "./safetensors.js";

export const SHARD_1 = "model-00001-of-00002.safetensors";
export const SHARD_2 = "model-00002-of-00002.safetensors";
export const INDEX = "model.safetensors.index.json";

/** Model k's tensors: three F32 and an I64 counter. */
export function tensors(k: number): TestTensor[] {
  const counter = Buffer.alloc(8);
  counter.writeBigInt64LE(BigInt(100 + k));
  return [
    { name: "embed.weight", dtype: "F32", shape: [2, 2], data: f32([k, -k, 0.5 * k, 3]) },
    { name: "layers.0.weight", dtype: "F32", shape: [3], data: f32([1 + k, 2, 3 * k]) },
    { name: "layers.1.weight", dtype: "F32", shape: [2], data: f32([k * k, -1]) },
    { name: "steps", dtype: "I64", shape: [], data: counter },
  ];
}

/** Model k in Hugging Face's sharded layout: two shards and their index. */
export function sharded(k: number): Record<string, Buffer> {
  const t = tensors(k);
  const first = t.slice(0, 2);
  const second = t.slice(2);
  const bytes = (list: TestTensor[]) => list.reduce((n, x) => n + x.data.length, 0);
  const index = {
    metadata: { total_size: bytes(t) },
    weight_map: Object.fromEntries([
      ...first.map((x) => [x.name, SHARD_1]),
      ...second.map((x) => [x.name, SHARD_2]),
    ]),
  };
  return {
    [SHARD_1]: buildSafetensors(first, { format: "pt" }),
    [SHARD_2]: buildSafetensors(second, { format: "pt" }),
    [INDEX]: Buffer.from(JSON.stringify(index)),
    "config.json": Buffer.from(JSON.stringify({ model_type: "toy", hidden_size: 2 })),
    "tokenizer.json": Buffer.from(JSON.stringify({ version: "1.0", seed: k })),
  };
}

/** A multipart/form-data body with one part per file, named by its file name. */
export function filesForm(files: [string, Buffer | string][]): FormData {
  const body = new FormData();
  for (const [name, bytes] of files) body.append("file", new Blob([bytes]), name);
  return body;
}

/** Uploads files as one checkpoint of model `name`. */
export function uploadFiles(h: Pick<Harness, "request">, files: Record<string, Buffer>, name: string) {
  return h.request(`/v1/checkpoints?name=${name}`, {
    method: "POST",
    body: filesForm(Object.entries(files)),
  });
}
