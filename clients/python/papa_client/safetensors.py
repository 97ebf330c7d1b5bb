"""Reading and writing safetensors files with the standard library; numpy and torch when present.

A file is an 8-byte little-endian header length, a JSON header (dtype, shape and data offsets
of each tensor, an optional ``__metadata__`` string map) padded with spaces to 8 bytes, then
the tensors' bytes back to back.
"""

import json
import struct
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

# safetensors dtype <-> numpy dtype name (BF16 and the F8s have none: they stay raw bytes).
NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


class Tensor(NamedTuple):
    """A tensor as the file holds it: its dtype, its shape and its little-endian bytes."""

    dtype: str
    shape: Tuple[int, ...]
    data: bytes


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def as_tensor(value) -> Tensor:
    """A `Tensor` from a Tensor, a numpy array or a torch tensor."""
    if isinstance(value, Tensor):
        return value
    module = type(value).__module__
    if module.startswith("torch"):
        return _from_torch(value)
    if module.startswith("numpy"):
        import numpy as np

        array = np.asarray(value, order="C")  # (ascontiguousarray would make a scalar 1-d)
        for name, np_dtype in NUMPY_DTYPES.items():
            if array.dtype == np.dtype(np_dtype):
                return Tensor(name, tuple(array.shape), array.astype(np_dtype, copy=False).tobytes())
        raise TypeError(f"no safetensors dtype for numpy {array.dtype}")
    raise TypeError(f"cannot store a {type(value).__name__} as a tensor")


def dumps(tensors: Mapping[str, object], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """A safetensors file of `tensors` (Tensor, numpy or torch values), in the mapping's order."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    chunks = []
    offset = 0
    for name, value in tensors.items():
        t = as_tensor(value)
        if len(t.data) != _count(t.shape) * ITEM_BYTES[t.dtype]:
            raise ValueError(f"tensor {name}: {len(t.data)} bytes do not fit shape {t.shape} of {t.dtype}")
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(t.data)]}
        chunks.append(t.data)
        offset += len(t.data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def loads(data: bytes) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """The tensors of a safetensors file, in file order, and its metadata."""
    (length,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    tensors = {}
    for name, entry in entries:
        begin, end = entry["data_offsets"]
        tensors[name] = Tensor(entry["dtype"], tuple(entry["shape"]), bytes(data[start + begin : start + end]))
    return tensors, metadata


def to_numpy(t: Tensor):
    """A numpy array of a tensor (BF16 and F8 tensors, which numpy lacks, as uint16 / uint8 bits)."""
    import numpy as np

    np_dtype = NUMPY_DTYPES.get(t.dtype) or ("<u2" if ITEM_BYTES[t.dtype] == 2 else "u1")
    return np.frombuffer(t.data, dtype=np_dtype).reshape(t.shape).copy()


def _torch_dtypes():
    import torch

    pairs = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }
    return pairs


def _from_torch(value) -> Tensor:
    import torch

    t = value.detach().to("cpu").contiguous()
    names = {v: k for k, v in _torch_dtypes().items()}
    if t.dtype not in names:
        raise TypeError(f"no safetensors dtype for torch {t.dtype}")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return Tensor(names[t.dtype], tuple(t.shape), raw.numpy().tobytes())


def to_torch(t: Tensor, like=None):
    """A torch tensor of a tensor, on `like`'s device and in its dtype when given."""
    import torch

    dtype = _torch_dtypes()[t.dtype]
    out = torch.frombuffer(bytearray(t.data), dtype=dtype).reshape(t.shape) if t.data else torch.empty(t.shape, dtype=dtype)
    if like is not None:
        out = out.to(device=like.device, dtype=like.dtype)
    return out


def state_dict_bytes(state_dict: Mapping[str, object]) -> bytes:
    """A safetensors file of a PyTorch state_dict (or any mapping of tensors)."""
    return dumps(state_dict)


def load_state_dict(data: bytes, like: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
    """A state_dict of torch tensors from a safetensors file, matching `like`'s dtypes and devices."""
    tensors, _ = loads(data)
    return {name: to_torch(t, None if like is None else like.get(name)) for name, t in tensors.items()}
