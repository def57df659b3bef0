"""MoE -> dense in the layer-sequential mode: each MoE layer's dense FFN is built while the layer is in memory, by
the in-memory path's own per-layer function (:func:`moekit.densify.densify._dense_ffn`), and written straight into
the dense checkpoint's shards (:func:`moekit.densify.densify.dense_state` names the tensors). The dense FFN width is
known before the walk from the shapes alone (K experts' width plus the shared expert's; the widest layer wins).
A Qwen2-MoE shared-expert gate is folded per layer: 0.5 when it is all zeros (``auto``), else its mean sigmoid on the
calibration tokens entering that layer.

Error-propagating (``propagate``): layer i's experts are scored on the hidden states the already densified layers
0..i-1 produce (the layer is profiled afresh on them, with the original profile's Gram sample size), and the
calibration states then run on through layer i with its new dense FFN in place of the MoE block: one extra layer
forward per layer.
"""

from __future__ import annotations

import copy
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
                       progress: bool = True, propagate: bool = False) -> dict:
    """Densify the checkpoint ``src`` into the dense checkpoint ``out`` one decoder layer at a time; returns the
    per-layer record the dense config keeps under ``moekit_densified``. ``propagate`` (needs ``tokens``): score
    layer i on what the already densified layers 0..i-1 compute; ``stats`` then only sets the Gram sample size."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from moekit.profile.profile import ProfileConfig
    from moekit.profile.stream import LayerProfiler

    cfg.validate()
    if propagate and tokens is None:
        raise MoekitError("error-propagating densify scores each layer on calibration text: pass tokens (--data)")
    profile_cfg = ProfileConfig(progress=False, gram_tokens=int(stats.meta.get("gram_tokens", 0)))
    engine = LayerSequential(src, device=device, dtype=dtype, progress=progress, desc="densify (layer-sequential)")
    layers = arch.require_moe(engine.model)
    engine.read_routers()
    stats.check_model(engine.model)
    gated = any(la.shared_gate is not None for la in layers) and cfg.shared_gate != "one"
    if (gated or propagate) and tokens is not None:
        engine = LayerSequential(src, tokens, device=device, dtype=dtype, batch_size=profile_cfg.batch_size,
                                 progress=progress, desc="densify (error-propagating)" if propagate else
                                 "densify (layer-sequential)")
    profiler = LayerProfiler(engine, profile_cfg, tokens) if propagate else None
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
            layer_stats = stats
            if profiler is not None and moe is not None:  # profiled afresh on the densified prefix's states
                gate_sums, layer_stats = _observe(layer, profiler, cfg)
            else:
                gate_sums = _observed_gate(layer, cfg) if engine.hidden is not None else None
            if moe is None:
                m = layer.module.mlp
                ffn = (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
            else:
                c = _shared_gate(moe, cfg, gate_sums) if moe.shared_gate is not None else 1.0
                ffn, record[str(layer.index)] = _dense_ffn(moe, layer_stats, cfg, c)
                if profiler is not None:
                    _forward_dense(layer, dense, _pad(ffn, width))
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


def _observed_gate(layer, cfg: DensifyConfig, run=None) -> tuple[float, int] | None:
    """Run the calibration states through ``layer`` (every layer must, so the next sees its inputs; ``run`` instead
    of ``layer.forward`` when given) and return the summed sigmoid of its shared-expert gate and the tokens seen
    (None: no gate to fold)."""
    gate = layer.moe.shared_gate if layer.moe is not None else None
    sums = [0.0, 0]

    def hook(_m, _i, out):
        sums[0] += float(torch.sigmoid(out.float()).sum())
        sums[1] += out.shape[:-1].numel()

    with Hooks() as hooks:
        if gate is not None and cfg.shared_gate != "one":
            hooks.forward(gate, hook)
        (run or layer.forward)()
    return (sums[0], sums[1]) if sums[1] else None


def _observe(layer, profiler, cfg: DensifyConfig) -> tuple[tuple[float, int] | None, ExpertStats]:
    """Profile ``layer`` on the current hidden states without moving them on: (shared-gate sums, its statistics)."""
    out = {}

    def run():
        out["acc"] = profiler.observe(layer, update=False)

    sums = _observed_gate(layer, cfg, run)
    results = out["acc"].results()
    live = ExpertStats(meta={"layers": [layer.index], "collected": list(results)},
                       tensors={f"{k}.{layer.index}": v for k, v in results.items()})
    return sums, live


def _forward_dense(layer, dense, ffn) -> None:
    """Move the calibration states on through ``layer`` with the dense FFN ``ffn`` (gate, up, down) in place of its
    MoE block: the dense model's own MLP class, the decoder layer's own forward."""
    attr = layer.moe.family.block_attr
    mlp = copy.deepcopy(dense.model.layers[layer.index].mlp).to_empty(device=layer.device)
    names = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    mlp.load_state_dict(dict(zip(names, ffn, strict=True)))
    block = getattr(layer.module, attr)
    setattr(layer.module, attr, mlp.to(layer.engine.dtype))
    try:
        layer.forward()
    finally:
        setattr(layer.module, attr, block)


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
