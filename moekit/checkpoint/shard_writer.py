"""Writing a checkpoint piece by piece, memory flat: the shards of the layer-sequential engine and of every save.

:class:`ShardWriter` takes tensors a group at a time (one decoder layer, the embedding table ...). Each group goes
to disk at once as a *part* file (safetensors), is read back tensor by tensor and compared with what was meant, and
is dropped from memory. :meth:`ShardWriter.close` then joins consecutive parts into shards of at most
``max_shard_bytes`` (bytes move file to file, see :mod:`moekit.checkpoint.safetensors_io`), names them the way
transformers does (``model-00001-of-00004.safetensors``, or ``model.safetensors`` when one is enough) and writes
the index json (``weight_map`` and ``metadata.total_size``). Shards are ≤ 5 GB by default, the Hub's advice (its
per-file limit is 50 GB).

The writer works inside a folder that :func:`moekit.outputs.staged_dir` hands out, so a failure leaves nothing
half-written at the target.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.checkpoint.safetensors_io import read_header
from moekit.errors import MoekitError
from moekit.outputs import write_json

DEFAULT_SHARD_BYTES = 5 * 10**9


class ShardWriter:
    """Shards of one checkpoint written into ``folder`` (a staged folder).

    ``prefix`` / ``suffix`` name the files: ``model`` + ``.safetensors`` for the standard form, moekit's own form
    uses its own so no engine picks it up by mistake. ``metadata`` goes into every shard's header.
    """

    def __init__(self, folder: str | Path, *, prefix: str = "model", suffix: str = ".safetensors",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None, verify: bool = True):
        self.folder = Path(folder)
        self.prefix, self.suffix = prefix, suffix
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.verify = verify
        self.parts: list[tuple[Path, int]] = []  # (part file, bytes of tensor data)
        self.names: set[str] = set()

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` now (split into parts of at most ``max_shard_bytes``), then check them on disk."""
        if not tensors:
            return
        clash = self.names & set(tensors)
        if clash:
            raise MoekitError(f"tensor '{sorted(clash)[0]}' written twice; this is a moekit bug, please report it")
        groups, size = [{}], 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            if groups[-1] and size + n > self.max_shard_bytes:
                groups.append({})
                size = 0
            groups[-1][name] = t.detach().to("cpu").contiguous()
            size += n
        for group in groups:
            part = self.folder / f".part-{len(self.parts):06d}{self.suffix}"
            write_part(part, group, self.metadata)
            if self.verify:
                check_written(part, group)
            self.parts.append((part, sum(t.numel() * t.element_size() for t in group.values())))
            self.names.update(group)

    def close(self) -> dict[str, str]:
        """Join the parts into shards, write the index (when there is more than one shard); returns the weight map."""
        shards: list[list[Path]] = []
        size = None
        for part, n in self.parts:
            if size is None or size + n > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(part)
            size += n
        if len(shards) == 1:
            names = [f"{self.prefix}{self.suffix}"]
        else:
            names = [f"{self.prefix}-{i + 1:05d}-of-{len(shards):05d}{self.suffix}" for i in range(len(shards))]
        weight_map, total = {}, 0
        for parts, name in zip(shards, names, strict=True):
            dst = self.folder / name
            if len(parts) == 1:
                parts[0].rename(dst)  # writes inside a staged_dir
            else:
                concat(parts, dst, self.metadata)
                for p in parts:
                    p.unlink()
            tensors, _, _ = read_header(dst)
            for key, info in tensors.items():
                weight_map[key] = name
                total += info.end - info.begin
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.folder / f"{self.prefix}{self.suffix}.index.json", index)
        self.parts = []
        return weight_map


def write_part(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None) -> None:
    """A safetensors file of ``tensors``, each written straight from its memory (safetensors' own ``save_file``
    first copies every tensor into one bytes object: a second copy of a whole decoder layer)."""
    from moekit.checkpoint.safetensors_io import DTYPES, header_bytes

    names = {dtype: name for name, dtype in DTYPES.items()}
    header, offset = {}, 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    with open(path, "wb") as fh:  # writes inside a staged_dir
        fh.write(header_bytes(header, metadata))
        for t in tensors.values():
            if t.numel():
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def check_written(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Read ``path`` back one tensor at a time and compare with ``tensors`` byte for byte."""
    infos, _, start = read_header(path)
    if set(infos) != set(tensors):
        raise MoekitError(f"'{path.name}' does not hold the tensors written to it; the disk may be failing")
    with open(path, "rb") as fh:
        for name, t in tensors.items():
            info = infos[name]
            want = t.reshape(-1).view(torch.uint8)
            back = torch.empty(info.end - info.begin, dtype=torch.uint8)
            fh.seek(start + info.begin)
            fh.readinto(memoryview(back.numpy()))
            if info.shape != list(t.shape) or not torch.equal(back, want):
                raise MoekitError(f"tensor '{name}' read back from '{path.name}' differs from what was written; "
                                  "the disk may be failing")


def concat(parts: list[Path], dst: Path, metadata: dict | None) -> None:
    """One safetensors file holding every tensor of ``parts``, in order; data copied file to file."""
    from moekit.checkpoint.safetensors_io import _copy_range, header_bytes

    header, sources, offset = {}, [], 0
    for part in parts:
        tensors, _, start = read_header(part)
        size = max((t.end for t in tensors.values()), default=0)
        for key, info in tensors.items():
            header[key] = {"dtype": info.dtype, "shape": info.shape,
                           "data_offsets": [offset + info.begin, offset + info.end]}
        sources.append((part, start, size))
        offset += size
    with open(dst, "wb") as fo:  # writes inside a staged_dir
        fo.write(header_bytes(header, metadata))
        fo.flush()
        for part, start, size in sources:
            with open(part, "rb") as fi:
                _copy_range(fi, fo, start, size)
