"""The one results formatter: Markdown tables, number formatting and atomic files (moekit.eval.results)."""

from __future__ import annotations


import pytest

from moekit.errors import MoekitError
from moekit.eval import results
from moekit.eval.results import MISSING, fmt, format_table, mib, millions, times


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
