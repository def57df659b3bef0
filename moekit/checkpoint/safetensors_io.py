"""Reading safetensors without loading it: the header, single tensors or rows at their offsets, and byte-for-byte
copies of a subset of a file's tensors (and row subsets of some).

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets relative to the data section; optional ``__metadata__``) and the raw data. Tensors are
C-contiguous, so rows along dim 0 are contiguous byte ranges: selecting experts on dim 0 is a list of
ranges. Bytes move with ``os.copy_file_range`` (in-kernel, like ``shutil.copyfile``), so memory stays flat
and the time is about that of copying the bytes kept.

FP8 block-scaled checkpoints (DeepSeek-V3, the Qwen3 FP8 releases) store a linear weight as ``float8_e4m3fn``
beside ``<name>_scale_inv`` (float32, one factor per block of ``weight_block_size`` = [128, 128] by default, from
config.json's ``quantization_config``): the weight is ``fp8 * scale_inv`` block-wise. :class:`CheckpointReader`
hands out the dequantized weights.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.checkpoint.paths import weight_files
from moekit.errors import MoekitError, reading


@dataclass
class TensorInfo:
    dtype: str
    shape: list[int]
    begin: int  # offsets in the data section
    end: int


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict | None, int]:
    """(tensors, metadata, byte offset of the data section) of a safetensors file."""
    with reading(path, "safetensors file", "re-download or re-save the checkpoint"), open(path, "rb") as f:
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


def merge_ranges(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """Byte ranges with each one that starts where the previous ends joined to it (order kept)."""
    merged: list[list[int]] = []
    for b, e in ranges:
        if merged and merged[-1][1] == b:
            merged[-1][1] = e
        else:
            merged.append([b, e])
    return merged


def header_bytes(header: dict, metadata: dict | None) -> bytes:
    """The start of a safetensors file: the header length, then the header padded to 8 bytes (as the library does)."""
    if metadata:
        header = {**header, "__metadata__": metadata}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


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
    with open(src, "rb") as fi, open(dst, "wb") as fo:  # writes inside a staged_dir
        fo.write(header_bytes(header, metadata))
        fo.flush()
        for b, e in merge_ranges(ranges):
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


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SCALE_SUFFIX = "_scale_inv"  # "<weight name>_scale_inv" holds the block scales of an FP8 weight
DEFAULT_BLOCK = (128, 128)


def fp8_block_size(config) -> tuple[int, int] | None:
    """The (rows, columns) of an FP8 block-scaled checkpoint's weight blocks, from its config (config.json's dict
    or a transformers config): ``quantization_config`` with ``quant_method`` "fp8"; None for any other config."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not qc or qc.get("quant_method") != "fp8":
        return None
    return tuple(qc.get("weight_block_size") or DEFAULT_BLOCK)


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D weight -> (float8_e4m3fn weight, float32 ``scale_inv`` [ceil(rows/b0), ceil(cols/b1)]), each block scaled
    so that its largest magnitude is the format's largest value (DeepSeek-V3's recipe)."""
    (o, i), (b0, b1) = w.shape, block
    pad = torch.nn.functional.pad(w.float(), (0, -i % b1, 0, -o % b0))
    blocks = pad.view(pad.shape[0] // b0, b0, pad.shape[1] // b1, b1)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(pad)[:o, :i]
    return q.to(torch.float8_e4m3fn), scale


def dequantize_fp8_blocks(fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                          dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8 * scale_inv`` block-wise; ``rows``: which rows of the full weight ``fp8`` holds (all when None)."""
    b0, b1 = block
    r = torch.arange(fp8.shape[0]) if rows is None else torch.as_tensor(rows)
    out = fp8.to(torch.float32)
    out.mul_(scale_inv.float()[r // b0].repeat_interleave(b1, dim=1)[:, : fp8.shape[1]])
    return out.to(dtype)


class CheckpointReader:
    """Reads named tensors -- or chosen rows of one -- from a directory of safetensors files.

    It reads with plain file reads at the offsets the safetensors header gives, instead of ``safe_open``'s
    memory map: every page of a mapped file that is touched counts in the process's resident memory, which
    would put the whole embedding table (and more) into the peak this mode exists to bound.

    FP8 weights come out dequantized (float32, or the ``dtype`` asked for); their ``*_scale_inv`` companions are
    left out of :meth:`read`. :attr:`stored_dtypes` and :attr:`is_fp8` say what is on disk.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where: dict[str, tuple[Path, TensorInfo, int]] = {}  # name -> (file, header entry, data start)
        files = weight_files(self.path)
        if not files:
            raise MoekitError(f"'{self.path}' has no *.safetensors weights: point at a checkpoint directory")
        for f in files:
            tensors, _, start = read_header(f)
            for key, info in tensors.items():
                self.where[key] = (f, info, start)
        config = {}
        if (self.path / "config.json").is_file():
            with reading(self.path / "config.json", "config", "re-download the checkpoint"):
                config = json.loads((self.path / "config.json").read_text())
        self.block = fp8_block_size(config) or DEFAULT_BLOCK

    @property
    def stored_dtypes(self) -> set[str]:
        """The safetensors dtypes of the stored tensors ("BF16", "F8_E4M3", ...), the FP8 scales left out."""
        return {info.dtype for key, (_, info, _) in self.where.items() if not self._is_scale(key)}

    @property
    def is_fp8(self) -> bool:
        return bool(self.stored_dtypes & set(FP8_DTYPES))

    def extra_layers(self, num_hidden_layers: int, prefix: str = "model.layers.") -> list[int]:
        """Decoder-layer indices on disk (under ``prefix``) at or beyond ``num_hidden_layers`` (DeepSeek-V3's
        multi-token-prediction layer is ``model.layers.61``), which the model built from config.json has no place for."""
        found = {int(m.group(1)) for key in self.where if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
        return sorted(i for i in found if i >= num_hidden_layers)

    def _is_scale(self, key: str) -> bool:
        return key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in self.where

    def _read(self, key: str, index: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor (or its rows ``index`` along dim 0), as stored: one read per contiguous run of rows."""
        if key not in self.where:
            raise MoekitError(f"tensor '{key}' is not in the checkpoint at {self.path}")
        f, info, start = self.where[key]
        if info.dtype not in DTYPES:
            raise MoekitError(f"tensor '{key}' has dtype {info.dtype}, which --stream cannot read; use the in-memory mode")
        rows = None if index is None else index.tolist()
        shape = info.shape if rows is None else [len(rows), *info.shape[1:]]
        out = torch.empty(shape, dtype=DTYPES[info.dtype])
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        pos = 0
        with open(f, "rb") as fh:
            for b, e in merge_ranges(row_ranges(info, rows)):
                fh.seek(start + b)
                fh.readinto(buf[pos : pos + e - b])
                pos += e - b
        return out

    def _dequantized(self, key: str, t: torch.Tensor, index: torch.Tensor | None, dtype) -> torch.Tensor:
        if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return t if dtype is None else t.to(dtype)
        if key + SCALE_SUFFIX not in self.where:
            raise MoekitError(f"tensor {key} is float8 without its weight_scale_inv: the checkpoint is incomplete; re-download it")
        shape = self.where[key][1].shape
        scale = self._read(key + SCALE_SUFFIX)
        want = [-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1])] if len(shape) == 2 else None
        if list(scale.shape) != want:
            raise MoekitError(f"tensor {key} is float8 {shape} with scales {list(scale.shape)}, not the 2-D weight with "
                              f"{list(self.block)} blocks moekit reads: dequantize the checkpoint to bf16 first")
        return dequantize_fp8_blocks(t, scale, self.block, dtype or torch.float32, index)

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``key`` (FP8 weights dequantized: float32 unless ``dtype``), cast to ``dtype`` when given."""
        return self._dequantized(key, self._read(key), None, dtype)

    def rows(self, key: str, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``index`` (sorted, unique) of a tensor along dim 0, read one contiguous run at a time (an FP8 weight's
        rows scaled by their blocks' rows of scales)."""
        return self._dequantized(key, self._read(key, index), index, dtype)

    def read(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keys relative to it (FP8 weights dequantized, their
        scales left out)."""
        return {key[len(prefix):]: self.tensor(key, dtype) for key in self.where
                if key.startswith(prefix) and not self._is_scale(key)}

    def readers(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, Callable[[], torch.Tensor]]:
        """Like :meth:`read`, full keys, but each value a function that reads its tensor when called: transformers'
        weight converters call them one group at a time (all of a layer's experts' gate projections, ...), so a
        layer's per-expert tensors and their stacked form are never in memory all at once."""
        return {key: functools.partial(self.tensor, key, dtype) for key in self.where
                if key.startswith(prefix) and not self._is_scale(key)}
