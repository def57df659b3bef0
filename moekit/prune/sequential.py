"""Pruning in the layer-sequential mode: any model size in the memory of one decoder layer.

The plan is the in-memory path's (:func:`moekit.prune.prune.prune_` on a weight-free copy of the model holding only
its routers), from a statistics file or from a layer-sequential profile run first (a first pass over the model;
every criterion and both budgets then work, the global one needing all layers' scores). The second pass reads each
decoder layer, keeps its planned experts (:meth:`moekit.core.arch.MoELayer.keep_experts`, the in-memory path's
own function) and writes it to the output shards.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from moekit.core import arch
from moekit.outputs import staged_dir
from moekit.core.keys import KEPT_KEY
from moekit.prune.prune import PruneConfig, prune_
from moekit.profile.stats import ExpertStats
from moekit.sequential.engine import LayerSequential


def prune_sequential(src: str | Path, cfg: PruneConfig, out: str | Path, *, stats: ExpertStats, overwrite: bool = False,
                     device: str | None = None, dtype=None, progress: bool = True) -> dict:
    """Prune the checkpoint ``src`` into ``out`` one decoder layer at a time; the same report as ``prune_``."""
    cfg.validate()
    engine = LayerSequential(src, device=device, dtype=dtype, progress=progress, desc="prune (layer-sequential)")
    arch.require_moe(engine.model)
    engine.read_routers()
    planned = copy.deepcopy(engine.model)  # meta experts: prune_ resizes them by shape; the routers are real
    report = prune_(planned, cfg, stats=stats)
    keep = {r["layer"]: r["kept"] for r in report["layers"] if r["experts_after"] != r["experts_before"]}
    with staged_dir(out, overwrite) as tmp:
        engine.write_to(tmp, standard=arch.is_uniform(planned))
        for layer in engine:
            if layer.index in keep:
                layer.moe.keep_experts(keep[layer.index])
        if getattr(planned.config, KEPT_KEY, None):
            setattr(engine.model.config, KEPT_KEY, getattr(planned.config, KEPT_KEY))
        engine.finish()
    return report


@torch.no_grad()
def profile_then_prune(src, cfg: PruneConfig, out, tokens: torch.Tensor, profile_cfg=None, **kw) -> tuple[dict, ExpertStats]:
    """Both passes: a layer-sequential profile on ``tokens``, then :func:`prune_sequential` on its statistics."""
    from moekit.profile.stream import profile_stream

    stats = profile_stream(src, tokens, profile_cfg, device=kw.get("device"), dtype=kw.get("dtype"))
    return prune_sequential(src, cfg, out, stats=stats, **kw), stats


@torch.no_grad()
def prune_propagating(src: str | Path, cfg: PruneConfig, out: str | Path, *, stats: ExpertStats, tokens: torch.Tensor,
                      profile_cfg=None, overwrite: bool = False, device: str | None = None, dtype=None,
                      progress: bool = True) -> dict:
    """Error-propagating pruning of the checkpoint ``src`` into ``out``, one decoder layer in memory at a time: the walk
    of :func:`moekit.prune.prune.propagating_plan` (layer i scored on what the pruned layers 0..i-1 compute) on
    the layer-sequential engine. ``stats`` (the original model's profile) only say which experts are super experts
    (kept). Uniform budgets only (a global one would need every layer's scores before the first is cut)."""
    from moekit.profile.stats import fingerprint
    from moekit.prune.prune import apply_plan, propagating_plan, protected_experts
    from moekit.prune.report import build_report, snapshot

    cfg.validate()
    cfg.propagates(True)  # the one-line error where the plan cannot propagate
    protect = protected_experts(stats, cfg)
    batch_size = profile_cfg.batch_size if profile_cfg is not None else 4
    engine = LayerSequential(src, tokens, device=device, dtype=dtype, batch_size=batch_size, progress=progress,
                             desc="prune (error-propagating)")
    arch.require_moe(engine.model)
    engine.read_routers()
    stats.check_model(engine.model)
    planned = copy.deepcopy(engine.model)  # meta experts: the record, the config, the report (shapes only)
    source = fingerprint(engine.model)
    with staged_dir(out, overwrite) as tmp:
        engine.write_to(tmp)
        keep = propagating_plan(engine, cfg, protect, tokens, profile_cfg)
        before = snapshot(planned)
        apply_plan(planned, keep, source_fingerprint=source)
        if getattr(planned.config, KEPT_KEY, None):
            setattr(engine.model.config, KEPT_KEY, getattr(planned.config, KEPT_KEY))
        engine.finish()
    report = build_report(before, snapshot(planned), keep, cfg)
    report["propagate"] = True
    return report
