"""Every file and folder moekit writes goes through here: whole or not at all, never over something without leave.

* Files (JSON, Markdown, PNG, statistics, reports): :func:`atomic_open` and the helpers on it
  (:func:`write_text`, :func:`write_json`, :func:`save_figure`, :func:`save_tensors`). The content goes to a
  temporary file in the target's folder, is flushed and fsynced, then ``os.replace``\\ s the target in one step; a
  failure at any point leaves the old file as it was and no temporary file behind. An existing target is refused
  unless ``overwrite=True`` (the CLI's ``--overwrite``).
* Folders (checkpoints, shard-wise outputs, quantized models): :func:`staged_dir` hands out a temporary
  directory beside the target and renames it into place on success; an existing non-empty target is refused
  unless ``overwrite``; what a killed writer left behind is removed by the next writer of the same target.

Both give the output the permissions the user's umask asks for (a serving container running as another user
must be able to read it). This module imports nothing from moekit but :mod:`moekit.errors`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from moekit.errors import MoekitError



@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8", *, overwrite: bool = False
                ) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path`` in one step.
    An existing ``path`` is refused unless ``overwrite``.

    ``mode``: ``"w"`` (text) or ``"wb"`` (binary). The data is flushed and fsynced before the rename; on any
    exception the temporary file is removed and ``path`` keeps its old content (or stays absent). The parent
    folder is created when missing. The new file gets the permissions a plain ``open`` would give it.
    """
    if mode not in ("w", "wb"):
        raise MoekitError(f"atomic_open writes whole files: mode 'w' or 'wb', not '{mode}'")
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise MoekitError(f"'{path}' already exists: pass --overwrite to replace it, or choose another path")


def write_text(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, overwrite=overwrite) as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | Path, obj, indent: int | None = 2, *, overwrite: bool = False, default=None) -> Path:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically; returns the path. ``default``: as json.dump's."""
    with atomic_open(path, overwrite=overwrite) as fh:
        json.dump(obj, fh, indent=indent, default=default)
        fh.write("\n")
    return Path(path)


def save_figure(fig, path: str | Path, *, overwrite: bool = False, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it; returns the path."""
    import matplotlib.pyplot as plt

    try:
        with atomic_open(path, "wb", overwrite=overwrite) as fh:
            fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write a safetensors file atomically (safetensors' own format, nothing pickled); returns the path."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with atomic_open(path, "wb", overwrite=overwrite) as fh:
        fh.write(data)
    return Path(path)


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` in ``path``'s folder, created with 0o666 less the umask (as ``open``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it (POSIX); best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- folders
def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty existing output before any work starts."""
    out = Path(out).expanduser()
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise MoekitError(f"output '{out}' already exists and is not empty: choose another path or pass --overwrite")
    return out


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``out`` to fill; on a clean exit it takes ``out``'s place in one rename (an
    existing ``out`` only with ``overwrite``), with the modes the user's umask asks for. On any exception, or a
    kill, ``out`` is untouched; what a killed writer left is removed by the next writer of the same target."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / WRITER_FILE).write_text(str(os.getpid()))
        yield tmp
        (tmp / WRITER_FILE).unlink()
        apply_umask(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


WRITER_FILE = ".moekit-writer"  # pid of the process writing a temporary directory; removed before the rename


def remove_stale_temporaries(out: Path) -> None:
    """Remove what a killed save of the same target left (``.NAME.tmp-*``), saying so in one line. A temporary
    whose writer process is still alive is left alone."""
    import os
    import sys

    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int((leftover / WRITER_FILE).read_text())
            os.kill(pid, 0)
            continue  # its writer is still running
        except (OSError, ValueError):
            pass
        size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file())
        shutil.rmtree(leftover, ignore_errors=True)
        print(f"moekit: removed {leftover.name} ({size / 2**20:.0f} MiB), left by an interrupted save of '{out}'",
              file=sys.stderr)


def apply_umask(root: Path) -> None:
    """``mkdtemp`` creates 0700 directories: give the output the modes the user's umask asks for, so that a
    serving container running as another user can read it."""
    mask = os.umask(0)
    os.umask(mask)
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
