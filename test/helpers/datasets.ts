import type { Harness } from "./harness.js";

/** An IDX file of unsigned bytes. */
export function idx(dims: number[], data: number[]): Buffer {
  const header = Buffer.alloc(4 + 4 * dims.length);
  header.writeUInt8(8, 2);
  header.writeUInt8(dims.length, 3);
  for (const [i, d] of dims.entries()) header.writeUInt32BE(d, 4 + 4 * i);
  return Buffer.concat([header, Buffer.from(data)]);
}

/** n 8x8 images of 3 classes: class k is a bright band in rows 2k..2k+1, plus noise. */
export function images(n: number, seed: number): { images: Buffer; labels: Buffer } {
  const pixels: number[] = [];
  const labels: number[] = [];
  for (let i = 0; i < n; i++) {
    const k = (i + seed) % 3;
    labels.push(k);
    for (let p = 0; p < 64; p++) pixels.push(Math.floor(p / 8) >> 1 === k ? 230 : (p * 37 + i * 11) % 40);
  }
  return { images: idx([n, 8, 8], pixels), labels: idx([n], labels) };
}

/** Files as multipart/form-data fields, one part per file. */
function form(files: Record<string, Buffer[]>): FormData {
  const data = new FormData();
  for (const [field, list] of Object.entries(files))
    for (const f of list) data.append(field, new Blob([f]), field);
  return data;
}

/** Three images per split, for uploads that only need to be valid. */
export function idxFiles(): Record<string, Buffer[]> {
  const d = images(3, 0);
  return {
    train_images: [d.images],
    train_labels: [d.labels],
    test_images: [d.images],
    test_labels: [d.labels],
  };
}

/** POST /v1/datasets with the files as multipart/form-data. */
export async function uploadDataset(
  h: Pick<Harness, "request">,
  query: string,
  files: Record<string, Buffer[]>,
) {
  const body = new Request("http://x", { method: "POST", body: form(files) });
  const bytes = Buffer.from(await body.arrayBuffer());
  return h.request(`/v1/datasets?${query}`, {
    method: "POST",
    body: bytes,
    headers: {
      "Content-Type": body.headers.get("content-type") ?? "",
      "Content-Length": String(bytes.length),
    },
  });
}
