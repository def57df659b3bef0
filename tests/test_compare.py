"""`moekit compare`: results side by side, a PNG of accuracy (and perplexity) against parameters."""

from __future__ import annotations

import json

import pytest

from moekit.eval.compare import compare_table, load_results, plot
from moekit.errors import MoekitError
from moekit.eval.harness import SCHEMA


def result(name, total, acc, ppl=None, costs=None):
    return {"schema": SCHEMA, "model": {"name": name, "fingerprint": "f" * 16, "params": {"total": total, "active": total // 2,
                                                                                        "experts": 0}},
            "tasks": {"arc_easy": {"acc": acc, "acc_norm": acc - 0.01, "summary": acc, "summary_metric": "acc", "n": 300},
                      "hellaswag": {"acc": 0.3, "acc_norm": 0.35, "summary": 0.35, "summary_metric": "acc_norm", "n": 10}},
            "perplexity": {"value": ppl, "data": "x", "tokens": 1, "window": 1} if ppl else None, "costs": costs,
            "data": {}, "settings": {}}


def write(tmp_path, name, r):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(r))
    return p


def test_table_and_plot(tmp_path):
    costs = {"models": [{"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0, "peak_forward_bytes": 2**20,
                         "checkpoint_bytes": None}]}
    costs2 = {"models": [{"prefill_tokens_per_s": 150.0, "decode_tokens_per_s": 12.0, "peak_forward_bytes": 2**19,
                          "checkpoint_bytes": None}]}
    paths = [write(tmp_path, "orig", result("orig", 135_000_000, 0.5, 27.1, costs)),
             write(tmp_path, "pruned", result("pruned", 100_000_000, 0.45, 30.2, costs2))]
    loaded = load_results(paths)
    table = compare_table(loaded)
    lines = table.splitlines()
    assert lines[0].startswith("| model | params | active | arc_easy (acc_norm) | hellaswag (acc_norm) | ppl |")
    # the files' own summary is acc (an older choice): the column still shows acc_norm for every row
    assert "| orig | 135.0M | 67.5M | 0.4900 (n=300) | 0.3500 (n=10) | 27.10 |" in table
    assert "| pruned | 100.0M | 50.0M | 0.4400 (n=300) | 0.3500 (n=10) | 30.20 |" in table
    assert "150 (x1.50)" in table and "(x0.50)" in table
    png = plot(loaded, tmp_path / "plots" / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "plots").glob(".*"))


def test_results_without_perplexity_plot_one_panel(tmp_path):
    import matplotlib.image

    loaded = load_results([write(tmp_path, "a", result("a", 10, 0.3)), write(tmp_path, "b", result("b", 20, 0.4))])
    one = matplotlib.image.imread(plot(loaded, tmp_path / "one.png"))
    loaded[0]["perplexity"] = {"value": 20.0}
    two = matplotlib.image.imread(plot(loaded, tmp_path / "two.png"))
    assert two.shape[1] > one.shape[1]  # a second panel for perplexity


def test_bad_result_files(tmp_path):
    with pytest.raises(MoekitError, match="does not exist"):
        load_results([tmp_path / "nope.json"])
    (tmp_path / "bad.json").write_text("{\n  oops")
    with pytest.raises(MoekitError, match=r"bad.json' is not valid JSON \(line 2"):
        load_results([tmp_path / "bad.json"])
    (tmp_path / "other.json").write_text(json.dumps({"results": {}}))
    with pytest.raises(MoekitError, match="not a moekit evaluation result"):
        load_results([tmp_path / "other.json"])
    with pytest.raises(MoekitError, match="no result files"):
        load_results([])
