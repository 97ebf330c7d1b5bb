import { createHash } from "node:crypto";
import { Readable, Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { describe, expect, it } from "vitest";
import {
  parseSafetensorsHeader,
  SafetensorsError,
  type SafetensorsSummary,
  SafetensorsValidator,
} from "../src/tensors/safetensors.js";
import { buildSafetensors, f32, rawSafetensors, smallCheckpoint } from "./helpers/safetensors.js";

/** Streams `bytes` through a validator in chunks of `chunkSize` and returns its summary. */
async function validate(bytes: Buffer, chunkSize = 7, maxHeaderBytes = 1024): Promise<SafetensorsSummary> {
  const chunks: Buffer[] = [];
  for (let i = 0; i < bytes.length; i += chunkSize) chunks.push(bytes.subarray(i, i + chunkSize));
  const validator = new SafetensorsValidator({ maxHeaderBytes, maxBytes: 1 << 20 });
  const out: Buffer[] = [];
  await pipeline(
    Readable.from(chunks),
    validator,
    new Writable({
      write(chunk, _enc, cb) {
        out.push(chunk);
        cb();
      },
    }),
  );
  expect(Buffer.concat(out).equals(bytes)).toBe(true);
  return validator.summary();
}

async function rejection(bytes: Buffer, maxHeaderBytes = 1024): Promise<SafetensorsError> {
  const err = await validate(bytes, 5, maxHeaderBytes).then(
    () => {
      throw new Error("expected the file to be rejected");
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SafetensorsError);
  return err as SafetensorsError;
}

const entry = (dtype: string, shape: number[], begin: number, end: number) => ({
  dtype,
  shape,
  data_offsets: [begin, end],
});
const file = (header: object, dataBytes: number) =>
  rawSafetensors(JSON.stringify(header), new Uint8Array(dataBytes));

describe("safetensors validation while streaming", () => {
  it("accepts a valid file and summarises it, whatever the chunking", async () => {
    const bytes = smallCheckpoint(3);
    for (const chunkSize of [1, 3, 8, 64, bytes.length]) {
      const summary = await validate(bytes, chunkSize);
      expect(summary.sha256).toBe(createHash("sha256").update(bytes).digest("hex"));
      expect(summary.sizeBytes).toBe(bytes.length);
      expect(summary.tensorCount).toBe(3);
      expect(summary.parameterCount).toBe(6 + 3 + 1);
      expect(summary.dtypes).toEqual(["F32", "I64"]);
      expect(summary.metadata).toEqual({ format: "pt", seed: "3" });
    }
  });

  it("accepts zero-element tensors, scalars, sub-byte dtypes and an empty tensor set", async () => {
    const bytes = file(
      { a: entry("F32", [0, 4], 0, 0), b: entry("F16", [], 0, 2), c: entry("F4", [2, 3], 2, 5) },
      5,
    );
    const summary = await validate(bytes);
    expect(summary.tensorCount).toBe(3);
    expect(summary.parameterCount).toBe(0 + 1 + 6);
    expect((await validate(rawSafetensors("{}"))).tensorCount).toBe(0);
  });

  it("orders tensors by offset, not by header order", async () => {
    const bytes = file({ late: entry("U8", [2], 2, 4), early: entry("U8", [2], 0, 2) }, 4);
    expect((await validate(bytes)).tensorCount).toBe(2);
    const header = parseSafetensorsHeader(bytes.subarray(8, 8 + Number(bytes.readBigUInt64LE(0))));
    expect(header.tensors.map((t) => t.name)).toEqual(["early", "late"]);
  });

  it.each([
    ["an empty body", Buffer.alloc(0), "truncated"],
    ["a body shorter than the length prefix", Buffer.from([1, 0, 0]), "truncated"],
    ["a file that ends inside the header", rawSafetensors('{"a":1}').subarray(0, 10), "truncated"],
    [
      "a file that ends inside the data",
      file({ w: entry("F32", [4], 0, 16) }, 16).subarray(0, -1),
      "truncated",
    ],
    [
      "bytes after the last tensor",
      Buffer.concat([file({ w: entry("F32", [1], 0, 4) }, 4), Buffer.from([0])]),
      "length_mismatch",
    ],
    ["a header length of 1", rawSafetensors("{"), "invalid_header"],
    ["a header that is not UTF-8", rawSafetensors("{}").fill(0xff, 8, 9), "invalid_header"],
    ["a header that does not start with '{'", rawSafetensors(' {"a": 1}'), "invalid_header"],
    ["invalid JSON", rawSafetensors('{"w": {"dtype": "F32",}}'), "invalid_header"],
    ["a JSON array header", rawSafetensors("[]"), "invalid_header"],
    ["trailing garbage after the JSON", rawSafetensors("{} x"), "invalid_header"],
    [
      "a duplicate tensor name",
      rawSafetensors(
        '{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        new Uint8Array(1),
      ),
      "invalid_header",
    ],
    [
      "a duplicate field inside an entry",
      rawSafetensors('{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', new Uint8Array(1)),
      "invalid_header",
    ],
    ["an unknown entry field", file({ w: { ...entry("U8", [1], 0, 1), extra: 1 } }, 1), "invalid_tensor"],
    ["a missing shape", file({ w: { dtype: "U8", data_offsets: [0, 1] } }, 1), "invalid_tensor"],
    ["an unknown dtype", file({ w: entry("F31", [1], 0, 4) }, 4), "invalid_tensor"],
    ["a negative dimension", file({ w: entry("U8", [-1], 0, 1) }, 1), "invalid_tensor"],
    ["a fractional dimension", file({ w: entry("U8", [1.5], 0, 1) }, 1), "invalid_tensor"],
    ["a non-string metadata value", file({ __metadata__: { a: 1 } }, 0), "invalid_header"],
    ["metadata that is not an object", file({ __metadata__: "x" }, 0), "invalid_header"],
    [
      "overlapping offsets",
      file({ a: entry("U8", [2], 0, 2), b: entry("U8", [2], 1, 3) }, 3),
      "invalid_offsets",
    ],
    [
      "a gap between tensors",
      file({ a: entry("U8", [2], 0, 2), b: entry("U8", [2], 3, 5) }, 5),
      "invalid_offsets",
    ],
    ["offsets that do not start at 0", file({ a: entry("U8", [2], 1, 3) }, 3), "invalid_offsets"],
    ["an end before the begin", file({ a: entry("U8", [0], 2, 1) }, 2), "invalid_offsets"],
    ["a byte size that does not match the shape", file({ w: entry("F32", [3], 0, 8) }, 8), "invalid_tensor"],
    [
      "sub-byte elements that do not fill whole bytes",
      file({ w: entry("F4", [3], 0, 2) }, 2),
      "invalid_tensor",
    ],
    [
      "an offset beyond 2^53",
      rawSafetensors('{"w":{"dtype":"U8","shape":[0],"data_offsets":[9007199254740993,9007199254740993]}}'),
      "invalid_tensor",
    ],
    [
      "a shape whose byte size overflows 2^53",
      rawSafetensors('{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'),
      "invalid_tensor",
    ],
  ])("rejects %s", async (_case, bytes, problem) => {
    expect((await rejection(bytes)).problem).toBe(problem);
  });

  it("rejects a header over the cap before reading it", async () => {
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(1025n);
    const err = await rejection(Buffer.concat([prefix, Buffer.alloc(16)]), 1024);
    expect(err.problem).toBe("header_too_large");
    expect(err.message).toContain("1024");
  });

  it("rejects a file over the size cap as soon as it is exceeded", async () => {
    const validator = new SafetensorsValidator({ maxBytes: 100 });
    const bytes = buildSafetensors([
      { name: "w", dtype: "F32", shape: [64], data: f32(new Array(64).fill(1)) },
    ]);
    const err = await pipeline(
      Readable.from([bytes]),
      validator,
      new Writable({ write: (_c, _e, cb) => cb() }),
    ).catch((e: unknown) => e);
    expect((err as SafetensorsError).problem).toBe("too_large");
  });

  it("names the offending tensor", async () => {
    const err = await rejection(file({ "layer.3.weight": entry("BF16", [2, 2], 0, 6) }, 6));
    expect(err.message).toContain('"layer.3.weight"');
    expect(err.message).toContain("needs 8");
  });
});
