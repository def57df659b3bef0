"""The one results formatter: Markdown tables, number formatting and atomic files (moekit.eval.results)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from moekit.errors import MoekitError
from moekit.eval import results
from moekit.eval.results import (MISSING, atomic_open, fmt, format_table, mib, millions, times, write_json,
                                 write_text)


def test_table_keeps_column_and_row_order():
    t = format_table(["b", "a", "c"], [["x", 1, 2.5], ["y", 3, 4.0]])
    assert t == "| b | a | c |\n|---|---|---|\n| x | 1 | 2.5 |\n| y | 3 | 4.0 |\n"


def test_table_shows_missing_for_none_and_keeps_strings():
    t = format_table(["name", "value"], [["a", None], [None, "1.0 (n=3)"]])
    assert t.splitlines()[2:] == [f"| a | {MISSING} |", f"| {MISSING} | 1.0 (n=3) |"]
    assert "| a | — |" in format_table(["name", "value"], [["a", None]], missing="—")


def test_table_number_formats_per_column_or_for_all():
    t = format_table(["model", "ppl", "acc", "tok/s", "bytes"], [["m", 27.123, 0.5, 1234.56, 2**20]],
                     formats=[None, ".2f", ".3f", ".0f", mib])
    assert t.splitlines()[2] == "| m | 27.12 | 0.500 | 1235 | 1.0 MiB |"
    assert format_table(["a", "b"], [[1, 2.25]], formats=".1f").splitlines()[2] == "| 1.0 | 2.2 |"
    # None never reaches the format: a format of the value cannot fail on a missing one
    assert format_table(["a"], [[None]], formats=mib).splitlines()[2] == f"| {MISSING} |"
    assert format_table(["a"], []) == "| a |\n|---|\n"


def test_table_alignment():
    assert format_table(["a", "b"], [], align="right").splitlines()[1] == "|---:|---:|"
    assert format_table(["a", "b", "c"], [], align=["left", "center", None]).splitlines()[1] == "|:---|:---:|---|"
    with pytest.raises(MoekitError, match="alignment"):
        format_table(["a"], [], align="middle")


def test_table_refuses_rows_of_the_wrong_width():
    with pytest.raises(MoekitError, match="row 1 has 1 cells for 2 columns"):
        format_table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(MoekitError, match="2 columns got 1 alignments"):
        format_table(["a", "b"], [], align=["left"])


def test_number_helpers():
    assert millions(135_000_000) == "135.0M" and millions(1_234_567, digits=2) == "1.23M"
    assert millions(99_999, digits=2, exact_below=1e5) == "99,999"
    assert millions(100_000, digits=2, exact_below=1e5) == "0.10M"
    assert mib(3 * 2**20) == "3.0 MiB" and mib(2**19, digits=2) == "0.50 MiB"
    assert times(150, 100) == "x1.50" and times(1, 3, digits=3) == "x0.333"
    assert times(None, 100) is None and times(5, 0) is None and times(5, None) is None
    assert fmt(None) == MISSING and fmt(None, ".2f", missing="—") == "—" and fmt(2.0, ".2f") == "2.00"


def test_write_json_and_text(tmp_path):
    p = write_json(tmp_path / "sub" / "r.json", {"a": [1, 2], "b": None})
    assert p.read_text() == json.dumps({"a": [1, 2], "b": None}, indent=2) + "\n"
    assert json.loads(write_json(tmp_path / "one.json", {"a": 1}, indent=1).read_text()) == {"a": 1}
    t = write_text(tmp_path / "r.md", "| é |\n")
    assert t.read_bytes() == "| é |\n".encode()
    write_text(t, "new\n")
    assert t.read_text() == "new\n"
    assert sorted(os.listdir(tmp_path)) == ["one.json", "r.md", "sub"]


def test_new_files_get_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE(write_text(tmp_path / "atomic", "x").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_failure_mid_write_leaves_the_old_file(tmp_path):
    p = write_json(tmp_path / "r.json", {"old": True})
    before = p.read_text()
    # json.dump streams: "{"a": 1, "b": " is already in the temporary file when the object fails to serialise
    with pytest.raises(TypeError):
        write_json(p, {"a": 1, "b": object()})
    assert p.read_text() == before
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_failing_serialiser_leaves_the_old_file(tmp_path, monkeypatch):
    p = write_json(tmp_path / "r.json", {"old": True})
    before = p.read_text()

    def half_then_fail(obj, fh, **kw):
        fh.write('{"half": ')
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(results.json, "dump", half_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_json(p, {"new": True})
    assert p.read_text() == before
    assert os.listdir(tmp_path) == ["r.json"]
    # a target that did not exist stays absent
    with pytest.raises(RuntimeError):
        write_json(tmp_path / "fresh.json", {"new": True})
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_failed_rename_leaves_the_old_file(tmp_path, monkeypatch):
    p = write_text(tmp_path / "r.md", "old\n")

    def no_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(results.os, "replace", no_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_text(p, "new\n")
    assert p.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["r.md"]


def test_atomic_open_binary_and_fsync(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(results.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    with atomic_open(tmp_path / "b.bin", "wb") as fh:
        fh.write(b"\x89PNG")
        assert not (tmp_path / "b.bin").exists()  # nothing at the target until the block ends
    assert (tmp_path / "b.bin").read_bytes() == b"\x89PNG"
    assert synced  # the data was fsynced before the rename
    with pytest.raises(MoekitError, match="mode"), atomic_open(tmp_path / "c", "a"):
        pass


def test_results_module_imports_only_errors_and_version():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(results.__file__).read_text(encoding="utf-8"))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {n for n in names if n.startswith("moekit")} <= {"moekit.errors", "moekit.version"}


def test_the_reports_share_the_formatter():
    """The same missing mark and layout from the eval table, the costs table and the compare table."""
    from moekit.eval.compare import compare_table
    from moekit.eval.costs import costs_table
    from moekit.eval.harness import SCHEMA, markdown_table

    r = {"schema": SCHEMA, "model": {"name": "m", "fingerprint": "f", "params": {"total": 2_000_000, "active": 10**6}},
         "tasks": {"arc_easy": {"acc": 0.5, "acc_norm": None, "summary": 0.5, "n": 4}}, "perplexity": None,
         "costs": {"models": [{"prefill_tokens_per_s": 10.0, "decode_tokens_per_s": None, "peak_forward_bytes": 0,
                               "checkpoint_bytes": None}]}}
    assert markdown_table([r]).splitlines()[2] == f"| m | 2.0M | 1.0M | {MISSING} |"
    assert f"| m | 10 (x1.00) | {MISSING} | 0 | {MISSING} |" in compare_table([r])
    costs = {"models": [{"name": "a", "params_total": 1e6}], "ratio": [{}]}
    assert f"| checkpoint_bytes | {MISSING} |" in costs_table(costs)
