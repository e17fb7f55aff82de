"""The safetensors file format, read and written from scratch: three parts, back to back.

    bytes 0..8          N, the length of the header: an unsigned 64-bit little-endian integer
    bytes 8..8+N        the header: JSON, {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
                                           ..., "__metadata__": {"key": "value"}}  (optional)
    bytes 8+N..         the data: every tensor's raw little-endian bytes, row-major, at data_offsets from here

The reader memory-maps the file, so a tensor is a view of the file's pages (torch is little-endian on every
platform, as the format is): loading a model never holds two copies of the weights. Every header field is
checked before it is trusted: a broken file raises `DeeBertError`, never a crash or a huge allocation.
"""

import json
import math
import struct
from pathlib import Path

import torch

from deebert.errors import DeeBertError
from deebert.files import write_atomically

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit too


def read_header(path) -> tuple[dict, int]:
    """Return (header, data_start): the parsed JSON header, checked, and where the data begins."""
    path = Path(path)
    if not path.is_file():
        raise DeeBertError(f"{path} not found; pass a checkpoint directory that holds model.safetensors")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise DeeBertError(f"{path}: truncated ({file_size} bytes, under the 8-byte header length); re-download it")
        (header_size,) = struct.unpack("<Q", prefix)  # little-endian unsigned 64-bit
        if header_size > file_size - 8 or header_size > MAX_HEADER_BYTES:  # checked before any allocation
            raise DeeBertError(f"{path}: header claims {header_size} bytes but the file has {file_size}; "
                               "the file is truncated or not safetensors, re-download it")
        header_bytes = f.read(header_size)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeeBertError(f"{path}: the header is not valid JSON ({err}); the file is not safetensors") from None
    if not isinstance(header, dict):
        raise DeeBertError(f"{path}: the header is not a JSON object; the file is not safetensors")
    data_start = 8 + header_size
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, data_size=file_size - data_start)
    return header, data_start


def _check_entry(path, name: str, entry, data_size: int) -> None:
    """One tensor's header entry must name a known dtype, a shape, and offsets inside the data."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise DeeBertError(f"{path}: tensor '{name}' lacks dtype, shape or data_offsets; the file is not safetensors")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise DeeBertError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise DeeBertError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise DeeBertError(f"{path}: tensor '{name}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise DeeBertError(f"{path}: tensor '{name}' lies at bytes {begin}..{end}, outside the {data_size} data bytes; "
                           "the file is truncated, re-download it")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise DeeBertError(f"{path}: tensor '{name}' has {end - begin} bytes, but {dtype} {shape} needs {expected}")


def load_file(path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file, as views of the memory-mapped file."""
    header, data_start = read_header(path)
    # Map the whole file privately: pages are read on first use; writing to a tensor never touches the file.
    file_bytes = torch.from_file(str(path), shared=False, size=Path(path).stat().st_size, dtype=torch.uint8)
    header.pop("__metadata__", None)  # strings, not tensors
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        raw = file_bytes[data_start + begin : data_start + end]
        if (data_start + begin) % dtype.itemsize:  # a view must be aligned to the element size
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors


def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """Write tensors as a safetensors file, atomically (see deebert/files.py)."""
    # Largest elements first keeps every tensor aligned to its element size, as the reference writer does.
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad with spaces so the data starts 8-byte aligned

    def write(temporary):
        with open(temporary, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
            for name in names:
                flat = tensors[name].detach().cpu().contiguous().reshape(-1)
                f.write(flat.view(torch.uint8).numpy().data)

    write_atomically(path, write)
