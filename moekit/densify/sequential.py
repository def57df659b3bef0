"""MoE -> dense in the layer-sequential mode: each MoE layer's dense FFN is built while the layer is in memory, by
the in-memory path's own per-layer function (:func:`moekit.densify.densify._dense_ffn`), and written straight into
the dense checkpoint's shards (:func:`moekit.densify.densify.dense_state` names the tensors). The dense FFN width is
known before the walk from the shapes alone (K experts' width plus the shared expert's; the widest layer wins).
A Qwen2-MoE shared-expert gate is folded per layer: 0.5 when it is all zeros (``auto``), else its mean sigmoid on the
calibration tokens entering that layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.core import arch
from moekit.core.dense import dense_config, dense_model_type
from moekit.core.hooks import Hooks
from moekit.core.keys import DENSIFIED_KEY
from moekit.densify.densify import DensifyConfig, _dense_ffn, _pad, dense_state
from moekit.errors import MoekitError
from moekit.outputs import staged_dir
from moekit.profile.stats import ExpertStats
from moekit.sequential.engine import LayerSequential


def _width(engine: LayerSequential, cfg: DensifyConfig) -> int:
    """The dense FFN width: the widest layer's (K experts + shared expert, or a dense layer's own FFN)."""
    widths = []
    for i, dl in enumerate(engine.layers):
        moe = engine.moe.get(i)
        if moe is None:
            widths.append(dl.mlp.gate_proj.weight.shape[0])
            continue
        shared = moe.shared_expert
        widths.append(min(cfg.keep, moe.num_experts) * moe.expert_size
                      + (shared.gate_proj.weight.shape[0] if shared is not None else 0))
    return max(widths)


@torch.no_grad()
def densify_sequential(src: str | Path, cfg: DensifyConfig, out: str | Path, *, stats: ExpertStats,
                       tokens: torch.Tensor | None = None, overwrite: bool = False, device: str | None = None, dtype=None,
                       progress: bool = True) -> dict:
    """Densify the checkpoint ``src`` into the dense checkpoint ``out`` one decoder layer at a time; returns the
    per-layer record the dense config keeps under ``moekit_densified``."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg.validate()
    engine = LayerSequential(src, device=device, dtype=dtype, progress=progress, desc="densify (layer-sequential)")
    layers = arch.require_moe(engine.model)
    engine.read_routers()
    stats.check_model(engine.model)
    gated = any(la.shared_gate is not None for la in layers) and cfg.shared_gate != "one"
    if gated and tokens is not None:
        engine = LayerSequential(src, tokens, device=device, dtype=dtype, progress=progress,
                                 desc="densify (layer-sequential)")
    from moekit.core.dense import _ATTN_BIAS_SUFFIXES

    engine.read_into_skeleton([n for n, _ in engine.model.named_parameters() if n.endswith(_ATTN_BIAS_SUFFIXES)])
    target = dense_model_type(engine.model)  # Qwen2-MoE: Qwen2 or Llama, by whether attention biases are non-zero
    width = _width(engine, cfg)
    with init_empty_weights():
        dense = AutoModelForCausalLM.from_config(dense_config(engine.model, width))
    targets = dense.state_dict()
    record = {}
    with staged_dir(out, overwrite) as tmp:
        engine.write_to(tmp)
        engine.target = dense
        for layer in engine:
            prefix = f"{engine.prefix}{layer.index}."
            moe = layer.moe
            gate_sums = _observed_gate(layer, cfg) if engine.hidden is not None else None
            if moe is None:
                m = layer.module.mlp
                ffn = (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
            else:
                c = _shared_gate(moe, cfg, gate_sums) if moe.shared_gate is not None else 1.0
                ffn, record[str(layer.index)] = _dense_ffn(moe, stats, cfg, c)
            src_state = {prefix + k: v for k, v in layer.module.state_dict().items()}
            mine = {k: t for k, t in targets.items() if k.startswith(prefix)}
            state = dense_state(src_state, mine, {layer.index: _pad(ffn, width)})
            layer.replacement = {k[len(prefix):]: v for k, v in state.items()}
            del src_state, state, ffn  # the engine frees the layer once it is written: hold none of its tensors
        setattr(dense.config, DENSIFIED_KEY, {"from": arch.model_type(engine.model), "to": target, "keep": cfg.keep,
                                              "score": cfg.score, "grouping": cfg.grouping,
                                              "down_scaling": cfg.down_scaling, "layers": record})
        engine.finish()
    return {"from": arch.model_type(engine.model), "to": target, "width": width, "layers": record, "mode": "sequential"}


def _observed_gate(layer, cfg: DensifyConfig) -> tuple[float, int] | None:
    """Run the calibration states through ``layer`` (every layer must, so the next sees its inputs) and return the
    summed sigmoid of its shared-expert gate and the tokens seen (None: no gate to fold)."""
    gate = layer.moe.shared_gate if layer.moe is not None else None
    sums = [0.0, 0]

    def hook(_m, _i, out):
        sums[0] += float(torch.sigmoid(out.float()).sum())
        sums[1] += out.shape[:-1].numel()

    with Hooks() as hooks:
        if gate is not None and cfg.shared_gate != "one":
            hooks.forward(gate, hook)
        layer.forward()
    return (sums[0], sums[1]) if sums[1] else None


def _shared_gate(moe: arch.MoELayer, cfg: DensifyConfig, observed: tuple[float, int] | None) -> float:
    """The constant replacing this layer's sigmoid shared-expert gate (see :mod:`moekit.densify.densify`)."""
    gate = moe.shared_gate
    if cfg.shared_gate == "one":
        return 1.0
    if cfg.shared_gate == "auto" and not bool(gate.weight.abs().max() > 0) and getattr(gate, "bias", None) is None:
        return 0.5
    if observed is None:
        raise MoekitError("this model's shared experts have learned sigmoid gates: pass calibration tokens "
                          "(--data) to fold their mean, or choose --shared-gate one")
    return observed[0] / observed[1]
