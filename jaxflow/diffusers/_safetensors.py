"""The safetensors format read and written with NumPy alone (bfloat16 through
`ml_dtypes`), so that a machine with JAX and no PyTorch loads a diffusers
transformer, and a bfloat16 checkpoint is never widened on the way.

The format: an 8-byte little-endian header length, a JSON header mapping each
tensor's name to its dtype, shape and byte range, then the raw bytes.
"""

import json
import pathlib

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def read(file) -> dict[str, np.ndarray]:
    """The tensors of one `.safetensors` file, memory-mapped (read on use)."""
    file = pathlib.Path(file)
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {entry['dtype']}.")
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        out[name] = data[begin:end].view(dtype).reshape(entry["shape"])
    return out


def write(file, tensors: dict[str, np.ndarray]) -> None:
    """Write NumPy arrays as one `.safetensors` file (readable by diffusers)."""
    header, offset, chunks = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be saved.")
        raw = array.tobytes()
        header[name] = dict(
            dtype=_NAMES[array.dtype],
            shape=list(array.shape),
            data_offsets=[offset, offset + len(raw)],
        )
        offset += len(raw)
        chunks.append(raw)
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for raw in chunks:
            f.write(raw)
