"""The report a user reads after a run: one Markdown file, PNG figures beside it.

Built from the step records :func:`moekit.recipe.run_recipe` returns (each ``eval`` step measured the model
as it was at that point), and from the profile step's statistics and figures.
"""

from __future__ import annotations

from pathlib import Path

from moekit.eval.results import format_table, millions
from moekit.outputs import write_text
from moekit.profile.plots import _pyplot, _save

_MISSING = "—"  # this report's mark for a figure not measured


def eval_rows(results: list[dict]) -> list[dict]:
    """One row per eval step, labelled by the model-changing steps before it."""
    rows, applied = [], []
    for r in results:
        if r["step"] == "eval":
            label = " + ".join(applied) or "original"
            rows.append({"label": label, **r})
        elif r["step"] not in ("profile",):
            applied.append(_step_label(r))
    return rows


def _step_label(record: dict) -> str:
    opts = record.get("options") or {}
    bits = ", ".join(f"{k}={v}" for k, v in opts.items() if not isinstance(v, (list, dict)) or k == "mitigations")
    return f"{record['step']}({bits})" if bits else record["step"]


def table(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in (r.get("tasks") or {})})
    head = ["model", "experts/layer", "top-k", "params total", "params active", "perplexity", *tasks,
            "prefill tok/s", "decode tok/s"]
    cells = []
    for r in rows:
        m = r.get("model", {})
        sp = r.get("speed") or {}
        cells.append([r["label"], _span(m.get("experts_per_layer")), _span(m.get("top_k")),
                      millions(m.get("params_total", 0)), millions(m.get("params_active", 0)),
                      (r.get("perplexity") or {}).get("value"), *[(r.get("tasks") or {}).get(t) for t in tasks],
                      sp.get("prefill_tokens_per_s"), sp.get("decode_tokens_per_s")])
    formats = [None] * 5 + [".2f"] + [".3f"] * len(tasks) + [".0f", ".1f"]
    return format_table(head, cells, formats=formats, missing=_MISSING).rstrip("\n")


def _span(values) -> str:
    if not values:
        return _MISSING
    return str(values[0]) if len(values) == 1 else f"{min(values)}–{max(values)}"


def accuracy_vs_params(rows: list[dict], path: Path) -> Path | None:
    pts = [(r["model"]["params_total"] / 1e6, _mean_acc(r), (r.get("perplexity") or {}).get("value"), _short(r["label"]),
            r["model"]["params_active"] / 1e6) for r in rows if r.get("model")]
    if not pts:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, idx, name in ((axes[0], 1, "mean task accuracy"), (axes[1], 2, "perplexity (lower is better)")):
        xs = [p[0] for p in pts if p[idx] is not None]
        ys = [p[idx] for p in pts if p[idx] is not None]
        ax.plot(xs, ys, "o-")
        for p in pts:
            if p[idx] is not None:
                ax.annotate(f"{p[3]} ({p[4]:.0f}M active)", (p[0], p[idx]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("total parameters (M)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle("What each step costs and what it saves")
    return _save(fig, path)


def _short(label: str) -> str:
    """'prune(...) + route(...)' -> '+route': the step that produced this row."""
    return label if label == "original" else "+" + label.split(" + ")[-1].split("(")[0]


def _mean_acc(row: dict) -> float | None:
    t = [v for v in (row.get("tasks") or {}).values() if v is not None]
    return sum(t) / len(t) if t else None


def experts_per_layer_plot(rows: list[dict], path: Path) -> Path | None:
    series = [(r["label"], r["model"].get("experts_by_layer")) for r in rows if r.get("model", {}).get("experts_by_layer")]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for label, counts in series:
        ax.step(range(len(counts)), counts, where="mid", label=label[:40])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("routed experts kept")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_report(results: list[dict], run_dir: str | Path, *, title: str = "moekit run", notes: list[str] = ()) -> Path:
    """``run_dir/report.md`` plus figures; returns the report's path."""
    run_dir = Path(run_dir)
    rows = eval_rows(results)
    figures: list[tuple[str, Path]] = []
    for r in results:
        if r["step"] == "profile":
            for f in r.get("figures", []):
                figures.append((Path(f).stem.replace("_", " "), Path(f)))
            break
    acc = accuracy_vs_params(rows, run_dir / "accuracy_vs_params.png")
    if acc:
        figures.append(("accuracy and perplexity against total parameters", acc))
    kept = experts_per_layer_plot(rows, run_dir / "experts_per_layer.png")
    if kept:
        figures.append(("experts kept per layer", kept))
    supers = next((r.get("super_experts") for r in results if r["step"] == "profile"), None)
    lines = [f"# {title}", "", table(rows), ""]
    if rows:
        first = rows[0]
        ppl = (first.get("perplexity") or {})
        if ppl:
            lines.append(f"Perplexity: first {ppl.get('tokens', 0):,} tokens of `{ppl.get('data')}` in 1024-token windows.")
        limit = first.get("limit")
        items = f"first {limit} items of each task (standard error about ±{0.5 / limit ** 0.5:.2f})" if limit else "all items"
        lines.append(f"Task accuracy: lm-evaluation-harness, zero-shot, {items}; acc_norm for hellaswag/click/ARC/OpenBookQA, acc otherwise.")
        lines.append("")
    if supers is not None:
        lines += [f"Super experts found (layer, expert): {supers or 'none'} — never pruned, merged or dropped.", ""]
    lines += list(notes)
    for caption, path in figures:
        lines += ["", f"## {caption[:1].upper() + caption[1:]}", "", f"![{caption}]({Path(path).relative_to(run_dir) if Path(path).is_relative_to(run_dir) else path})"]
    return write_text(run_dir / "report.md", "\n".join(lines) + "\n")
