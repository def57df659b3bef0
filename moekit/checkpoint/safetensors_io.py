"""Reading safetensors without loading it: the header, single tensors or rows at their offsets, and byte-for-byte
copies of a subset of a file's tensors (and row subsets of some).

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

import torch

from moekit.checkpoint.paths import weight_files
from moekit.errors import MoekitError


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
    if not isinstance(header, dict):
        raise MoekitError(f"'{path}' is not a safetensors file (bad header)")
    meta = header.pop("__metadata__", None)
    try:
        tensors = {k: TensorInfo(v["dtype"], list(v["shape"]), *v["data_offsets"]) for k, v in header.items()}
    except (KeyError, TypeError, ValueError):
        raise MoekitError(f"'{path}' is not a safetensors file (bad header)") from None
    end = 8 + n + max((t.end for t in tensors.values()), default=0)
    size = os.path.getsize(path)
    if size < end:
        raise MoekitError(f"'{path}' is cut short ({size:,} of {end:,} bytes): re-download or re-save the checkpoint")
    return tensors, meta, 8 + n


def row_ranges(info: TensorInfo, rows: list[int] | None) -> list[tuple[int, int]]:
    """Byte ranges (data-section offsets) of ``rows`` along dim 0, or of the whole tensor."""
    if rows is None:
        return [(info.begin, info.end)]
    row = (info.end - info.begin) // info.shape[0]
    return [(info.begin + r * row, info.begin + (r + 1) * row) for r in rows]


def write_subset(
    src: str | Path,
    dst: str | Path,
    items: list[tuple[str, TensorInfo, list[int] | None]],
    metadata: dict | None,
    data_start: int | None = None,
) -> int:
    """Write ``dst`` holding, for each (new name, source tensor, rows or None), that tensor (or those rows)
    of ``src`` (whose data section starts at ``data_start``, read from its header when not given).
    Returns the bytes of tensor data written."""
    if data_start is None:
        data_start = read_header(src)[2]
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
    with open(src, "rb") as fi, open(dst, "wb") as fo:  # writes inside a staged_dir
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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointReader:
    """Reads named tensors -- or chosen rows of one -- from a directory of safetensors files.

    It reads with plain file reads at the offsets the safetensors header gives, instead of ``safe_open``'s
    memory map: every page of a mapped file that is touched counts in the process's resident memory, which
    would put the whole embedding table (and more) into the peak this mode exists to bound.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where: dict[str, tuple[Path, TensorInfo, int]] = {}  # name -> (file, header entry, data start)
        for f in weight_files(self.path):
            tensors, _, start = read_header(f)
            for key, info in tensors.items():
                self.where[key] = (f, info, start)

    def _entry(self, key: str):
        if key not in self.where:
            raise MoekitError(f"tensor '{key}' is not in the checkpoint at {self.path}")
        f, info, start = self.where[key]
        if info.dtype not in _DTYPES:
            raise MoekitError(f"tensor '{key}' has dtype {info.dtype}, which --stream cannot read; use the in-memory mode")
        return f, _DTYPES[info.dtype], list(info.shape), start + info.begin

    def tensor(self, key: str) -> torch.Tensor:
        f, dtype, shape, offset = self._entry(key)
        out = torch.empty(shape, dtype=dtype)
        with open(f, "rb") as fh:
            fh.seek(offset)
            fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (sorted, unique) of a 2-D tensor, read one contiguous run at a time."""
        f, dtype, shape, offset = self._entry(key)
        out = torch.empty(len(index), shape[1], dtype=dtype)
        row_bytes = out[0].numel() * out.element_size()
        buf = out.view(torch.uint8).numpy()
        idx = index.tolist()
        with open(f, "rb") as fh:
            i = 0
            while i < len(idx):
                j = i
                while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
                    j += 1
                fh.seek(offset + idx[i] * row_bytes)
                fh.readinto(memoryview(buf[i : j + 1]))
                i = j + 1
        return out

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keys relative to it."""
        return {key[len(prefix):]: self.tensor(key) for key in self.where if key.startswith(prefix)}
