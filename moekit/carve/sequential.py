"""Healing's closed-form and layer-local steps in the layer-sequential mode.

Two checkpoints are walked side by side, one decoder layer of each in memory at a time: the MoE being healed
(:class:`~moekit.sequential.engine.LayerSequential` with the calibration states) and its teacher (the dense source,
or the MoE before compression; read, never written). Each MoE layer is healed by the in-memory path's own per-layer
function (:func:`moekit.carve.heal._heal_layer`: router fit, least-squares down projections, local reconstruction)
on the FFN inputs the already healed layers 0..i-1 produce, against the teacher FFN's outputs on those inputs, and
written. The end-to-end stages (distillation, fine-tuning) need the whole model: they are refused here by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.carve.heal import HEAL_FAMILIES, HealConfig, _heal_layer
from moekit.core import arch
from moekit.errors import MoekitError
from moekit.outputs import staged_dir
from moekit.sequential.engine import LayerSequential


@torch.no_grad()
def heal_sequential(src: str | Path, teacher: str | Path, cfg: HealConfig, out: str | Path, *, tokens: torch.Tensor,
                    overwrite: bool = False, device: str | None = None, dtype=None, progress: bool = True) -> dict:
    """Heal the MoE checkpoint ``src`` toward ``teacher`` on ``tokens`` [n, L] into ``out``, one decoder layer at a
    time; the report of :func:`moekit.carve.heal.heal_` (per healed layer, the relative FFN error after each step)."""
    cfg.validate()
    if cfg.distill_steps > 0 or (cfg.finetune != "none" and cfg.finetune_steps > 0):
        raise MoekitError("distillation and fine-tuning train the whole model end to end: run them with --mode memory "
                          "(the layer-sequential mode does the router, lstsq and local steps)")
    engine = LayerSequential(src, tokens, device=device, dtype=dtype, batch_size=cfg.batch_size, progress=progress,
                             desc="heal (layer-sequential)")
    teach = LayerSequential(teacher, device=device, dtype=dtype, progress=False)
    layers = arch.require_moe(engine.model)
    for layer in layers:
        if layer.family.name not in HEAL_FAMILIES:
            raise MoekitError(f"healing supports softmax top-k routers ({', '.join(HEAL_FAMILIES)}), not '{layer.family.name}'")
    if len(teach.layers) != len(engine.layers) or teach.model.config.hidden_size != engine.model.config.hidden_size:
        raise MoekitError("the teacher must have the same number of layers and hidden size as the MoE being healed")
    wanted = {layer.index for layer in layers} if cfg.layers is None else set(cfg.layers)
    report: dict = {"layers": {}, "mode": "sequential"}
    with staged_dir(out, overwrite) as tmp:
        engine.write_to(tmp)
        for layer, t_layer in zip(engine, teach, strict=True):
            view = layer.moe if layer.moe is not None and layer.index in wanted else None
            calls = [engine.calls[b - a][layer.index] for a, b in engine.batches]
            if any(args for args, _ in calls):
                raise MoekitError(f"{arch.model_type(engine.model)}'s decoder layers take positional arguments beyond "
                                  "the hidden states; heal it with --mode memory")
            states = [engine.hidden[a:b].to(engine.device) for a, b in engine.batches]
            new = _heal_layer(layer.module, t_layer.module, view, states, [kw for _, kw in calls], cfg,
                              report["layers"])
            for (a, b), h in zip(engine.batches, new, strict=True):
                engine.hidden[a:b] = h.to("cpu", engine.dtype)
        engine.finish()
    return report
