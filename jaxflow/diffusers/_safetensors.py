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


_REMEDY = (
    "delete it (for a hub id, the model's folder in the Hugging Face cache) and download "
    "the checkpoint again"
)


def _not_safetensors(file, why: str) -> ValueError:
    return ValueError(
        f"{file}: not a safetensors header: {why}. The file is damaged, or something else "
        f"saved under this name (an HTML error page, a Git LFS pointer); {_REMEDY}."
    )


def _header(file: pathlib.Path, file_size: int) -> tuple[dict, int]:
    """The JSON header of a safetensors file and its length, checked for form."""
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(
                file, f"the file has {file_size} bytes, fewer than the 8-byte header length"
            )
        size = int.from_bytes(prefix, "little")
        if size > file_size - 8:
            raise _not_safetensors(
                file,
                f"its first 8 bytes give a header length of {size} bytes, more than the "
                f"file's {file_size} bytes",
            )
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _not_safetensors(file, f"its {size} header bytes are not JSON ({error})") from None
    if not isinstance(header, dict):
        raise _not_safetensors(file, "the header is JSON but not an object")
    return header, size


def _entry(file, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """One tensor's dtype, shape and byte range from the header, checked for form."""
    try:
        dtype_name, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise _not_safetensors(file, f"tensor {name!r} has the entry {entry!r}") from None
    if dtype_name not in _DTYPES:
        raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {dtype_name}.")
    dtype = _DTYPES[dtype_name]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if min(shape, default=0) < 0 or begin < 0 or end - begin != expected:
        raise _not_safetensors(
            file,
            f"tensor {name!r} of dtype {dtype_name} and shape "
            f"{list(shape)} needs {expected} bytes and the header gives bytes "
            f"[{begin}, {end})",
        )
    return dtype, shape, begin, end


def read(file) -> dict[str, np.ndarray]:
    """The tensors of one `.safetensors` file, memory-mapped (read on use).

    **Raises:** `ValueError` naming the file, the tensor and the fault where the
    file is not a safetensors file (a header that is not one) or is truncated
    (the bytes expected and found), with the remedy: download it again.
    """
    file = pathlib.Path(file)
    file_size = file.stat().st_size
    header, size = _header(file, file_size)
    entries = {
        name: _entry(file, name, entry) for name, entry in header.items() if name != "__metadata__"
    }
    data_size = file_size - 8 - size
    needed = max((end for *_, end in entries.values()), default=0)
    if needed > data_size:
        # the first tensor (in file order) that the file does not hold whole
        name = min((e[2], n) for n, e in entries.items() if e[3] > data_size)[1]
        begin, end = entries[name][2:]
        raise ValueError(
            f"{file} is truncated: expected {8 + size + needed} bytes, found {file_size}; "
            f"tensor {name!r} needs data bytes [{begin}, {end}) and the file holds "
            f"{data_size}. An interrupted download or copy; {_REMEDY}."
        )
    if data_size == 0:  # np.memmap refuses an empty region
        data = np.zeros(0, np.uint8)
    else:
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + size)
    return {
        name: data[begin:end].view(dtype).reshape(shape)
        for name, (dtype, shape, begin, end) in entries.items()
    }


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
