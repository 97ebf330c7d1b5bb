#!/usr/bin/env python3
"""Baseline for bench/merge.ts: a uniform average as a user would write it with numpy.
Loads every input whole, averages float tensors in float32, copies the others from the first
input, writes safetensors. usage: numpy_merge.py OUT IN1 IN2 ..."""
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, memoryview(data)[8 + n :]


def main():
    out, paths = sys.argv[1], sys.argv[2:]
    inputs = [load(p) for p in paths]
    first_header, first_body = inputs[0]
    header, chunks, offset = {}, [], 0
    for name, meta in sorted(first_header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        s, e = meta["data_offsets"]
        if meta["dtype"] in DTYPES:
            acc = np.zeros((e - s) // np.dtype(DTYPES[meta["dtype"]]).itemsize, dtype=np.float32)
            for h, body in inputs:
                hs, he = h[name]["data_offsets"]
                acc += np.frombuffer(body[hs:he], DTYPES[meta["dtype"]]).astype(np.float32)
            raw = (acc / len(inputs)).astype(DTYPES[meta["dtype"]]).tobytes()
        else:
            raw = bytes(first_body[s:e])
        header[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - (len(text) + 8) % 8) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


if __name__ == "__main__":
    main()
