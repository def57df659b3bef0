"""Re-routing in the layer-sequential mode: each layer planned, calibrated and changed while it is in memory.

The per-layer steps are the in-memory path's (:func:`moekit.route.route._base_plan`, :func:`rescale_factor`,
:func:`moekit.route.runtime.install`, ``_scale_experts``); ``rescale`` fits its constant on the tokens entering the
layer's MoE block, which here are the original model's (the hidden states passed on are the unchanged layer's
outputs), as in memory. ``allocate`` and ``adaptive`` compare layers with each other before changing any; they run
in memory only (one line says so).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.core.keys import MEAN_OUT, ROUTE_KEY
from moekit.errors import MoekitError
from moekit.outputs import staged_dir
from moekit.profile.stats import ExpertStats
from moekit.route.calibrate import rescale_factor
from moekit.route.route import RouteConfig, _base_plan, _check, _mean_out, _report, _scale_experts
from moekit.route.runtime import install
from moekit.sequential.engine import LayerSequential

NEEDS_ALL_LAYERS = ("allocate", "adaptive")


@torch.no_grad()
def route_sequential(src: str | Path, cfg: RouteConfig, out: str | Path, *, stats: ExpertStats,
                     tokens: torch.Tensor | None = None, overwrite: bool = False, device: str | None = None, dtype=None,
                     batch_size: int = 4, progress: bool = True, propagate: bool = False) -> dict:
    """Re-route the checkpoint ``src`` into ``out`` one decoder layer at a time; the report of ``route_``.

    ``propagate``: ``rescale`` fits layer i's constant on the tokens the already re-routed layers 0..i-1 produce
    (error propagation; the target stays the original layer's top-K output on those tokens)."""
    cfg.validate()
    mits = set(cfg.mitigations)
    if mits & set(NEEDS_ALL_LAYERS):
        raise MoekitError(f"{', '.join(sorted(mits & set(NEEDS_ALL_LAYERS)))} compares all layers before changing one, "
                          "which the layer-sequential mode does not do: use --mode memory")
    needs_x = "rescale" in mits
    engine = LayerSequential(src, tokens if needs_x else None, device=device, dtype=dtype, batch_size=batch_size,
                             progress=progress, desc="route (layer-sequential)")
    layers = arch.require_moe(engine.model)
    _check(cfg, layers, tokens)
    if {"compensate", "super"} & mits:
        engine.read_routers()
        stats.check_model(engine.model)
    big_k = {layer.index: layer.top_k for layer in layers}
    before = arch.param_counts(engine.model)
    plans = {layer.index: _base_plan(layer, cfg, mits, stats) for layer in layers}
    means = {layer.index: _mean_out(stats, layer) for layer in layers} if "compensate" in mits else {}
    standard = not any(p.rerouted for p in plans.values()) and len({p.k for p in plans.values()}) == 1 and not means
    scales = {}
    with staged_dir(out, overwrite) as tmp:
        engine.write_to(tmp, standard=standard)
        for layer in engine:
            moe = layer.moe
            if moe is None:
                if needs_x:
                    layer.forward()
                continue
            if moe.index in means:
                moe.experts.register_buffer(MEAN_OUT, means[moe.index].to(moe.experts.down_proj))
            if needs_x:
                xs = []
                with Hooks() as hooks:
                    hooks.pre(moe.block, lambda _m, args, xs=xs: xs.append(args[0].reshape(-1, args[0].shape[-1])))
                    layer.forward(update=not propagate)
                scales[moe.index] = rescale_factor(moe, plans[moe.index], torch.cat(xs), cfg.rescale_mode)
            install(moe, plans[moe.index], means.get(moe.index))
            if moe.index in scales:
                _scale_experts(moe, scales[moe.index])
            if needs_x and propagate:
                layer.forward()  # the next layer sees what the re-routed layer computes
        record = {str(i): asdict(p) for i, p in plans.items() if p.rerouted}
        if record:
            setattr(engine.model.config, ROUTE_KEY, record)
        engine.finish()
    report = _report(engine.model, layers, plans, big_k, before, None, scales, {}, cfg, mits)
    report.update(mode="sequential", propagate=propagate)
    return report
