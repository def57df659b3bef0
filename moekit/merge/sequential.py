"""Merging in the layer-sequential mode: the groups are planned from the statistics for every layer first
(:func:`moekit.merge.merge.plan_groups`), then each layer is merged while it is in memory by the in-memory path's
own per-layer function (:func:`moekit.merge.merge._merge_layer`: router rows, learned coefficients), on the tokens
entering its MoE block in the original model.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.core.keys import KEPT_KEY
from moekit.merge.fit import split_holdout
from moekit.merge.merge import MergeConfig, _merge_layer, check_inputs, plan_groups
from moekit.outputs import staged_dir
from moekit.profile.stats import ExpertStats
from moekit.sequential.engine import LayerSequential


def merge_sequential(src: str | Path, cfg: MergeConfig, out: str | Path, *, stats: ExpertStats,
                     tokens: torch.Tensor | None = None, overwrite: bool = False, device: str | None = None, dtype=None,
                     progress: bool = True, propagate: bool = False) -> dict:
    """Merge the checkpoint ``src`` into ``out`` one decoder layer at a time; the report of ``merge_``.

    ``propagate``: layer i's router rows and coefficients are fitted on the tokens the already merged layers 0..i-1
    produce (error propagation; the target stays the original block's output on those tokens)."""
    engine = LayerSequential(src, tokens, device=device, dtype=dtype, batch_size=cfg.batch_size, progress=progress,
                             desc="merge (layer-sequential)")
    layers = arch.require_moe(engine.model)
    engine.read_routers()
    check_inputs(engine.model, layers, cfg, stats, tokens)
    plan = plan_groups(layers, stats, cfg)
    split = split_holdout(len(tokens), cfg.holdout, cfg.seed) if tokens is not None else None
    report = {"config": asdict(cfg), "params_before": arch.param_counts(engine.model), "layers": []}
    with staged_dir(out, overwrite) as tmp:
        engine.write_to(tmp, standard=len({len(g) for g in plan.values()}) == 1)
        for layer in engine:
            if layer.moe is None:
                if tokens is not None:
                    layer.forward()
                continue
            inputs = None
            if tokens is not None:
                xs = []
                with Hooks() as hooks:
                    hooks.pre(layer.moe.block, lambda _m, a, xs=xs: xs.append(a[0].detach().float().cpu()))
                    layer.forward(update=not propagate)
                inputs = {layer.index: torch.cat(xs)}
            report["layers"].append(_merge_layer(layer.moe, plan[layer.index], stats, cfg, inputs, split))
            if tokens is not None and propagate:
                layer.forward()  # the next layer sees what the merged layer computes
        if hasattr(engine.model.config, KEPT_KEY):  # merged experts are no longer a subset of the pruned source's
            delattr(engine.model.config, KEPT_KEY)
        engine.finish()
    report["params_after"] = arch.param_counts(engine.model)
    report["experts_after"] = {layer.index: layer.num_experts for layer in layers}
    report.update(mode="sequential", propagate=propagate)
    return report
