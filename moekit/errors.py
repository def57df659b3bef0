"""One exception type for every mistake a user can make, and the one place library errors become it.

A :class:`MoekitError` message is a single line that names the problem and the fix; the CLI prints it and exits
with status 2, so bad input never produces a traceback or a half-written output.

Library exceptions are turned into it at the edges: :func:`reading` wraps every read of a user's file
(checkpoints, data, statistics, results, recipes) and names that file; :func:`explain` turns what can reach the
CLI from anywhere (a full disk, a read-only or vanished folder, CUDA out of memory) into a line for
``moekit.cli.main``. Anything else is a moekit bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path


class MoekitError(Exception):
    """A user-facing error: one line, the problem and the fix."""


def first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text[:limit] or type(e).__name__


@contextlib.contextmanager
def reading(path: str | Path, what: str, fix: str) -> Iterator[None]:
    """Around a read of ``path`` (a ``what``): a library error becomes one line naming the file and ``fix``."""
    try:
        yield
    except (MoekitError, MemoryError, KeyboardInterrupt):
        raise
    except UnicodeDecodeError as e:
        raise MoekitError(f"{what} '{path}' is not UTF-8 text (undecodable byte at offset {e.start}): {fix}") from None
    except json.JSONDecodeError as e:
        raise MoekitError(f"{what} '{path}' is not valid JSON (line {e.lineno}: {e.msg}): {fix}") from None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR):
            raise MoekitError(f"cannot read {what} '{path}': {e.strerror}: {fix}") from None
        raise MoekitError(f"cannot read {what} '{path}' ({first_line(e)}): {fix}") from None
    except Exception as e:  # noqa: BLE001 (safetensors, gguf, transformers and yaml raise their own types)
        if "mismatched" in str(e) or "size mismatch" in str(e):
            raise MoekitError(f"{what} '{path}': the weights do not have the shapes its config.json describes "
                              f"({first_line(e, 120)}): {fix}") from None
        raise MoekitError(f"cannot read {what} '{path}' ({type(e).__name__}: {first_line(e)}): {fix}") from None


def explain(e: BaseException) -> str | None:
    """The one line for an exception that reached the CLI from a file system or device, or None (a bug)."""
    if isinstance(e, OSError) and e.errno is not None:
        where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
        if e.errno == errno.ENOSPC:
            return (f"the disk is full while writing{where}: nothing was replaced (outputs are written whole, then renamed); "
                    "free space there or write elsewhere")
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write{where}: {e.strerror}: choose a folder this user can write"
        if e.errno == errno.EDQUOT:
            return f"disk quota exceeded while writing{where}: free space or write elsewhere"
    text = str(e)
    if "No space left on device" in text or "os error 28" in text:  # a library's writer (safetensors: Rust I/O)
        return ("the disk is full while writing the output: nothing was replaced (outputs are written whole, then "
                "renamed); free space there or write elsewhere")
    if "Read-only file system" in text or "os error 30" in text:
        return "cannot write the output: read-only file system: choose a folder this user can write"
    name = type(e).__name__
    if name == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "CUDA out of memory" in str(e)):
        return "the device ran out of memory: lower --batch-size / --seq-len, or use --device cpu"
    return None
