"""What pruning did: experts and parameters per layer before and after, as JSON, a table and a plot.

The table follows the Samsung AI Challenge 2025 pipeline's form: one row per MoE layer with ``# experts`` and
``# parameters`` (of the whole MoE block: routed experts, router, shared experts), before -> after,
and a total row with the whole model's parameters.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from moekit.core import arch
from moekit.eval.results import format_table, millions
from moekit.outputs import save_figure, write_json, write_text


def snapshot(model) -> dict:
    """Experts and MoE-block parameters per layer, and the model's parameter counts (works on meta models)."""
    layers = [
        {
            "layer": layer.index,
            "experts": layer.num_experts,
            "top_k": layer.top_k,
            "params": sum(p.numel() for p in layer.block.parameters()),
        }
        for layer in arch.moe_layers(model)
    ]
    return {"layers": layers, "params": arch.param_counts(model)}


def build_report(before: dict, after: dict, keep: dict[int, list[int]], cfg) -> dict:
    rows = []
    for b, a in zip(before["layers"], after["layers"], strict=True):
        rows.append(
            {
                "layer": b["layer"],
                "experts_before": b["experts"],
                "experts_after": a["experts"],
                "params_before": b["params"],
                "params_after": a["params"],
                "kept": keep.get(b["layer"]),
            }
        )
    return {
        "config": asdict(cfg),
        "layers": rows,
        "params_before": before["params"],
        "params_after": after["params"],
        "experts_before": sum(r["experts_before"] for r in rows),
        "experts_after": sum(r["experts_after"] for r in rows),
    }


def _m(n: int) -> str:
    return millions(n, digits=2, exact_below=1e5)


def report_markdown(report: dict) -> str:
    c = report["config"]
    how = (
        f"keep {c['keep']}"
        if c.get("keep") is not None
        else f"ratio {c['ratio']}"
        if c.get("ratio") is not None
        else f"top-{c['top_k_prime']} >= {c['tau']}"
    )
    rows = [
        [str(r["layer"]), f"{r['experts_before']} -> {r['experts_after']}",
         f"{_m(r['params_before'])} -> {_m(r['params_after'])}"]
        for r in report["layers"]
    ]
    pb, pa = report["params_before"], report["params_after"]
    rows.append(["**total**", f"{report['experts_before']} -> {report['experts_after']}", f"{_m(pb['total'])} -> {_m(pa['total'])}"])
    return (
        f"# Expert pruning: criterion {c['criterion']}, {how}, budget {c['budget']}\n\n"
        + format_table(["layer", "# experts", "# parameters"], rows, align="right")
        + f"\nActive parameters per token: {_m(pb['active'])} -> {_m(pa['active'])}; "
        f"in routed experts: {_m(pb['experts'])} -> {_m(pa['experts'])}.\n"
    )


def plot_experts(report: dict, path: str | Path) -> Path:
    """Bar plot of experts kept per layer (PNG), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = report["layers"]
    x = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(x) + 2), 3.2))
    ax.bar(x, [r["experts_before"] for r in rows], color="#dddddd", label="before")
    ax.bar(x, [r["experts_after"] for r in rows], color="#3b75af", label="kept")
    c = report["config"]
    ax.set(
        xlabel="decoder layer",
        ylabel="routed experts",
        title=f"experts kept per layer ({c['criterion']}, {c['budget']})",
    )
    ax.set_ylim(0, max(r["experts_before"] for r in rows) * 1.25)  # room for the legend above the bars
    ax.legend(loc="upper right", ncol=2, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def write_report(report: dict, out_dir: str | Path, stem: str = "prune_report") -> list[Path]:
    """``stem``.json, ``stem``.md and ``experts_per_layer.png`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    return [write_json(out_dir / f"{stem}.json", report, indent=1),
            write_text(out_dir / f"{stem}.md", report_markdown(report)),
            plot_experts(report, out_dir / "experts_per_layer.png")]
