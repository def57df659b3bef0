"""What pruning did: experts and parameters per layer before and after, as JSON, a table and a plot.

The table follows the challenge team's form: one row per MoE layer with ``# experts`` and
``# parameters`` (of the whole MoE block: routed experts, router, shared experts), before -> after,
and a total row with the whole model's parameters.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from moekit.core import arch


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
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def report_markdown(report: dict) -> str:
    c = report["config"]
    how = (
        f"keep {c['keep']}"
        if c.get("keep") is not None
        else f"ratio {c['ratio']}"
        if c.get("ratio") is not None
        else f"top-{c['top_k_prime']} >= {c['tau']}"
    )
    lines = [
        f"# Expert pruning: criterion {c['criterion']}, {how}, budget {c['budget']}",
        "",
        "| layer | # experts | # parameters |",
        "|---:|---:|---:|",
    ]
    for r in report["layers"]:
        lines.append(
            f"| {r['layer']} | {r['experts_before']} -> {r['experts_after']} | "
            f"{_m(r['params_before'])} -> {_m(r['params_after'])} |"
        )
    pb, pa = report["params_before"], report["params_after"]
    lines.append(
        f"| **total** | {report['experts_before']} -> {report['experts_after']} | "
        f"{_m(pb['total'])} -> {_m(pa['total'])} |"
    )
    lines += [
        "",
        f"Active parameters per token: {_m(pb['active'])} -> {_m(pa['active'])}; "
        f"in routed experts: {_m(pb['experts'])} -> {_m(pa['experts'])}.",
    ]
    return "\n".join(lines) + "\n"


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(report: dict, out_dir: str | Path, stem: str = "prune_report") -> list[Path]:
    """``stem``.json, ``stem``.md and ``experts_per_layer.png`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", report_markdown(report))):
        p = out_dir / f"{stem}{suffix}"
        tmp = out_dir / f".{p.name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, p)
        paths.append(p)
    paths.append(plot_experts(report, out_dir / "experts_per_layer.png"))
    return paths
