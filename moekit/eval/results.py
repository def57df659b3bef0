"""The one results formatter: Markdown tables and number formatting.

Every report moekit writes (``moekit eval`` results, ``moekit compare``, cost figures, the prune report, the
run report) builds its tables with :func:`format_table`, so a table looks the same everywhere; the files
themselves are written by :mod:`moekit.outputs`.

This module imports nothing from moekit but :mod:`moekit.errors`, so any part of the package can use it.

An evaluation result (``moekit eval --out``, :func:`moekit.eval.harness.evaluate`) is a plain dict with a
stable schema (``SCHEMA``), written by :func:`moekit.eval.harness.write_result` as JSON plus a Markdown table::

    {"schema": "moekit.eval/1", "moekit_version", "harness_version", "created",
     "model": {"name", "fingerprint", "model_type", "dtype", "device", "params": {"total", "experts", "active"}},
     "tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "summary", "summary_metric", "n"}},
     "data": {task: {"source": "local" | "hub", "path", "sha256", "records"} | {"source": "hub", "dataset"}},
     "settings": {"limit", "num_fewshot", "batch_size", "reuse_context", "backend", "data_dir", "data_files"},
     "costs": {...} | None, "perplexity": {...} | None, "seconds": float}

``acc`` / ``acc_norm`` are the harness's own numbers (``None`` where a task defines no such metric);
``summary`` is the one metric a table shows: ``acc_norm`` for hellaswag, click, ARC and OpenBookQA, ``acc``
otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from moekit.errors import MoekitError

SCHEMA = "moekit.eval/1"
MISSING = "-"
"""What a table shows for a value that was not measured (``None``)."""

_ALIGN = {"left": ":---", "right": "---:", "center": ":---:", None: "---"}

Format = str | Callable[[Any], str] | None

__all__ = ["MISSING", "SCHEMA", "format_table", "fmt", "mib", "millions", "times"]


# ---------------------------------------------------------------- numbers


def fmt(value, spec: str = "", missing: str = MISSING) -> str:
    """``format(value, spec)``, or ``missing`` for None."""
    return missing if value is None else format(value, spec)


def millions(n, digits: int = 1, exact_below: float | None = None) -> str:
    """``135.0M``; with ``exact_below``, counts under it in full with thousands separators (``99,999``)."""
    if exact_below is not None and n < exact_below:
        return f"{n:,}"
    return f"{n / 1e6:.{digits}f}M"


def mib(n, digits: int = 1) -> str:
    """Bytes as ``3.0 MiB``."""
    return f"{n / 2**20:.{digits}f} MiB"


def times(value, base, digits: int = 2) -> str | None:
    """``value / base`` as ``x1.50``; None where either is missing or ``base`` is zero."""
    if value is None or not base:
        return None
    return f"x{value / base:.{digits}f}"


# ---------------------------------------------------------------- tables


def format_table(columns: Sequence[str], rows: Iterable[Sequence], *, align: str | Sequence[str | None] | None = None,
                 formats: Format | Sequence[Format] = None, missing: str = MISSING) -> str:
    """A Markdown table: a header row of ``columns``, then one line per row, ending in a newline.

    A cell that is None shows ``missing``; a string shows as it is; anything else goes through the column's
    entry of ``formats`` (a format spec such as ``".3f"``, or a function of the value), else ``str``.
    ``align``: ``left`` / ``right`` / ``center`` for every column, or one per column (None: the renderer's
    default, left).
    """
    n = len(columns)
    aligns = [align] * n if align is None or isinstance(align, str) else list(align)
    specs = [formats] * n if formats is None or isinstance(formats, str) or callable(formats) else list(formats)
    if len(aligns) != n or len(specs) != n:
        raise MoekitError(f"a table of {n} columns got {len(aligns)} alignments and {len(specs)} formats")
    if any(a not in _ALIGN for a in aligns):
        raise MoekitError(f"unknown column alignment in {aligns}: use left, right or center")
    lines = [_row(columns), "|" + "|".join(_ALIGN[a] for a in aligns) + "|"]
    for i, row in enumerate(rows):
        if len(row) != n:
            raise MoekitError(f"table row {i} has {len(row)} cells for {n} columns ({', '.join(columns)})")
        lines.append(_row([_cell(v, s, missing) for v, s in zip(row, specs, strict=True)]))
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(value, spec: Format, missing: str) -> str:
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    if callable(spec):
        return spec(value)
    return format(value, spec) if spec else str(value)
