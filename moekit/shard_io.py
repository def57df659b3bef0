"""Copy a subset of a safetensors file's tensors (and row subsets of some) byte for byte, without loading them.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets relative to the data section; optional ``__metadata__``) and the raw data. Tensors are
C-contiguous, so rows along dim 0 are contiguous byte ranges: selecting experts on dim 0 is a list of
ranges. Bytes move with ``os.copy_file_range`` (in-kernel, like ``shutil.copyfile``), so memory stays flat
and the time is about that of copying the bytes kept.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import MoekitError


@dataclass
class TensorInfo:
    dtype: str
    shape: list[int]
    begin: int  # offsets in the data section
    end: int


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict | None, int]:
    """(tensors, metadata, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise MoekitError(f"'{path}' is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise MoekitError(f"'{path}' is not a safetensors file (bad header)") from None
    meta = header.pop("__metadata__", None)
    tensors = {k: TensorInfo(v["dtype"], list(v["shape"]), *v["data_offsets"]) for k, v in header.items()}
    return tensors, meta, 8 + n


def row_ranges(info: TensorInfo, rows: list[int] | None) -> list[tuple[int, int]]:
    """Byte ranges (data-section offsets) of ``rows`` along dim 0, or of the whole tensor."""
    if rows is None:
        return [(info.begin, info.end)]
    row = (info.end - info.begin) // info.shape[0]
    return [(info.begin + r * row, info.begin + (r + 1) * row) for r in rows]


def write_subset(
    src: str | Path, dst: str | Path, items: list[tuple[str, TensorInfo, list[int] | None]], metadata: dict | None
) -> int:
    """Write ``dst`` holding, for each (new name, source tensor, rows or None), that tensor (or those rows)
    of ``src``. Returns the bytes of tensor data written."""
    _, _, data_start = read_header(src)
    header, ranges, offset = {}, [], 0
    for name, info, rows in sorted(items, key=lambda it: it[1].begin):
        rs = row_ranges(info, rows)
        size = sum(e - b for b, e in rs)
        shape = list(info.shape) if rows is None else [len(rows), *info.shape[1:]]
        header[name] = {"dtype": info.dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        ranges += rs
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as the safetensors library writes it
    merged: list[list[int]] = []
    for b, e in ranges:
        if merged and merged[-1][1] == b:
            merged[-1][1] = e
        else:
            merged.append([b, e])
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.write(struct.pack("<Q", len(blob)))
        fo.write(blob)
        fo.flush()
        for b, e in merged:
            _copy_range(fi, fo, data_start + b, e - b)
    return offset


def _copy_range(fi, fo, start: int, count: int) -> None:
    try:
        while count > 0:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), count, start)
            if n == 0:
                raise MoekitError(f"'{fi.name}' ended early: the safetensors file is truncated")
            start += n
            count -= n
    except (AttributeError, OSError):  # no copy_file_range here (or across file systems): plain reads
        fi.seek(start)
        fo.seek(0, os.SEEK_END)
        while count > 0:
            chunk = fi.read(min(count, 64 << 20))
            if not chunk:
                raise MoekitError(f"'{fi.name}' ended early: the safetensors file is truncated") from None
            fo.write(chunk)
            count -= len(chunk)
        fo.flush()
