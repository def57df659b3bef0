"""Side by side: several evaluation results (``moekit eval`` JSON files) in one table and one picture.

The picture plots each task's summary metric (and perplexity, where measured) against the model's parameters,
one point per result, labelled with the model's name: how much accuracy each step of compression costs.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.errors import MoekitError, reading
from moekit.eval.harness import SCHEMA, markdown_table
from moekit.eval.results import format_table, times
from moekit.eval.tasks import summary_metric


def load_results(paths) -> list[dict]:
    """Read result files, refusing anything that is not a moekit evaluation result."""
    if not paths:
        raise MoekitError("no result files given: pass one or more JSON files written by `moekit eval --out`")
    results = []
    for p in map(Path, paths):
        if not p.is_file():
            raise MoekitError(f"result file '{p}' does not exist")
        with reading(p, "result file", "pass JSON files written by `moekit eval --out`"):
            r = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(r, dict) or r.get("schema") != SCHEMA:
            raise MoekitError(f"{p} is not a moekit evaluation result (schema '{SCHEMA}'): write it with `moekit eval --out`")
        r.setdefault("model", {}).setdefault("name", None)
        if not r["model"]["name"]:
            r["model"]["name"] = p.stem
        results.append(r)
    return results


def compare_table(results: list[dict]) -> str:
    """Markdown: the task table, then cost figures per model where measured (ratios to the first model)."""
    text = markdown_table(results)
    rows = [(r["model"]["name"], r["costs"]["models"][r["costs"].get("model_index", 0)]) for r in results if r.get("costs")]
    if rows:
        keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_forward_bytes", "checkpoint_bytes")
        base = rows[0][1]
        cells = [[name, *[_with_ratio(c.get(k), base.get(k)) for k in keys]] for name, c in rows]
        text += "\nCosts (absolute figures are machine-dependent; ratios are to the first model; each file was "
        text += "measured in its own run unless `--baseline` measured both together)\n\n" + format_table(["model", *keys], cells)
    return text


def _with_ratio(value, base) -> str | None:
    """``1,500 (x1.50)``: the figure and its ratio to the first model's."""
    if value is None:
        return None
    ratio = times(value, base)
    return f"{value:,.0f}" + (f" ({ratio})" if ratio else "")


def plot(results: list[dict], out: str | Path, params: str = "total") -> Path:
    """PNG: summary metric per task (and perplexity) against parameters (``total`` or ``active``)."""
    from moekit.profile.plots import _pyplot, _save

    if params not in ("total", "active"):
        raise MoekitError(f"unknown parameter count '{params}': use total or active")
    plt = _pyplot()
    has_ppl = any(r.get("perplexity") for r in results)
    fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(11 if has_ppl else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    x = [r["model"]["params"][params] / 1e6 for r in results]
    tasks: list[str] = []
    for r in results:
        tasks += [t for t in r["tasks"] if t not in tasks]
    for t in tasks:
        pts = sorted((xi, r["tasks"][t]["summary"]) for xi, r in zip(x, results, strict=True)
                     if t in r["tasks"] and r["tasks"][t]["summary"] is not None)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{t} ({summary_metric(t)})")
    _label_points(ax, x, [max((v["summary"] or 0) for v in r["tasks"].values()) if r["tasks"] else 0 for r in results],
                  [r["model"]["name"] for r in results])
    ax.set_xlabel(f"parameters, {params} (millions)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs parameters")
    ax.grid(alpha=0.3)
    if tasks:
        ax.legend(fontsize=8)
    if has_ppl:
        ax2 = axes[0][1]
        pts = [(xi, r["perplexity"]["value"], r["model"]["name"]) for xi, r in zip(x, results, strict=True)
               if r.get("perplexity")]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s-", color="tab:red")
        _label_points(ax2, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
        ax2.set_xlabel(f"parameters, {params} (millions)")
        ax2.set_ylabel("perplexity (lower is better)")
        ax2.set_title("perplexity vs parameters")
        ax2.grid(alpha=0.3)
    return _save(fig, out)


def _label_points(ax, xs, ys, names) -> None:
    for xi, yi, name in zip(xs, ys, names, strict=True):
        ax.annotate(str(name), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
