"""Pictures of a statistics file (PNG, matplotlib's Agg backend), reusable by the report.

* :func:`selection_heatmap` -- how often each expert is selected (layers x experts);
* :func:`super_expert_plot` -- the super-expert statistic (max |down_proj output|) per layer, with the threshold;
* :func:`massive_activation_plot` -- max |hidden state| after each decoder layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.outputs import save_figure
from moekit.profile.stats import ExpertStats, massive_layers, super_expert_threshold, super_experts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Through moekit's one writer; the command decided beforehand whether the plots folder may be replaced."""
    return save_figure(fig, path, overwrite=True)


def selection_frequency(stats: ExpertStats) -> torch.Tensor:
    """[MoE layers, max experts]: fraction of tokens that selected each expert (NaN where a layer has fewer)."""
    stats.require("rank_counts", what="the selection-frequency heatmap")
    rows = [stats.get("rank_counts", layer).double().sum(1) for layer in stats.layers]
    width = max(r.numel() for r in rows)
    out = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r / max(stats.tokens, 1)
    return out


def selection_heatmap(stats: ExpertStats, path: str | Path) -> Path:
    plt = _pyplot()
    freq = selection_frequency(stats).numpy()
    fig, ax = plt.subplots(figsize=(min(2 + 0.12 * freq.shape[1], 20), min(1.5 + 0.25 * freq.shape[0], 14)))
    im = ax.imshow(freq, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(len(stats.layers)), [str(v) for v in stats.layers], fontsize=7)
    ax.set_title(f"selection frequency (fraction of {stats.tokens:,} tokens)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def super_expert_plot(stats: ExpertStats, path: str | Path, rule: str = "paper") -> Path:
    plt = _pyplot()
    thr = super_expert_threshold(stats)
    found = set(super_experts(stats, rule=rule)) if stats.has("hidden_max") or rule != "paper" else set()
    fig, ax = plt.subplots(figsize=(9, 4))
    for layer in stats.layers:
        a = stats.get("down_max", layer).float()
        ax.scatter([layer] * a.numel(), a.numpy(), s=6, color="tab:blue", alpha=0.5)
        for e in range(a.numel()):
            if (layer, e) in found:
                ax.scatter([layer], [a[e].item()], s=40, color="tab:red")
                ax.annotate(f"{layer},{e}", (layer, a[e].item()), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if stats.has("shared_down_max"):
        shared = [(layer, stats.get("shared_down_max", layer).max().item()) for layer in stats.layers
                  if f"shared_down_max.{layer}" in stats.tensors]
        if shared:
            ax.scatter(*zip(*shared, strict=True), s=14, marker="x", color="tab:green", label="shared expert")
    if thr is not None:
        ax.axhline(thr, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {thr:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max |down_proj output|")
    ax.set_title(f"super-expert statistic ({rule} rule: {len(found)} found, red)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def massive_activation_plot(stats: ExpertStats, path: str | Path) -> Path:
    plt = _pyplot()
    stats.require("hidden_max", what="the massive-activation plot")
    hm = stats.get("hidden_max").float().numpy()
    formed = massive_layers(stats)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(range(len(hm)), hm, marker="o", markersize=3)
    for layer in formed:
        ax.axvline(layer, color="tab:red", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max |hidden state| after the layer")
    ax.set_title("massive activations" + (f" (form at layers {formed})" if formed else " (none form)"))
    return _save(fig, path)


def write_plots(stats: ExpertStats, out_dir: str | Path, rule: str = "paper") -> list[Path]:
    out_dir = Path(out_dir)
    return [
        selection_heatmap(stats, out_dir / "selection_frequency.png"),
        super_expert_plot(stats, out_dir / "super_experts.png", rule=rule),
        massive_activation_plot(stats, out_dir / "massive_activations.png"),
    ]
