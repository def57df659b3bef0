"""MoE -> dense: score the experts, select (or group) K per layer, concatenate them into one dense FFN.

Kim et al., "Pruning and Distilling Mixture-of-Experts into Dense Language Models" (2026). The result
is a NEW standard dense transformers model (:func:`moekit.core.dense.dense_model_type`: Qwen3-MoE -> Qwen3,
Qwen2-MoE -> Qwen2 or Llama, Mixtral -> Mistral, DeepSeek-V3 -> DeepSeek-V3 with every layer dense);
refine it afterwards with :func:`moekit.distill.distill` from the MoE teacher.

Per MoE layer, with the K chosen experts e_1..e_K (canonical gate/up [I,H], down [H,I]):

    gate_proj = [gate_e1; ...; gate_eK; gate_shared]          [K*I + S, H]
    up_proj   = [up_e1;   ...; up_eK;   up_shared]
    down_proj = [m a_1 down_e1, ..., m a_K down_eK, c down_shared]   [H, K*I + S]

so that the dense FFN computes  m * sum_k a_k f_ek(x) + c * shared(x).

* a_k = 1/K (``down_scaling="uniform"``) or score_k / sum(scores) (``"score"``).
* m, the routed mass, folds in what the router multiplied the experts by: the routed scaling factor when
  top-k weights are renormalised (they then sum to it), otherwise the mean sum of top-k weights per token
  measured by the profiler (``weight_sum``). ``fold_routed_mass=False`` uses m = 1.
* Shared experts are copied unscaled (c = 1), except Qwen2-MoE's, which the MoE multiplies by a
  token-dependent sigmoid gate that a dense FFN cannot express. c is then that gate folded to a constant
  (``shared_gate``): ``auto`` = exactly 0.5 when the gate's weights are all zero (sigmoid(0), as in an MoE
  carved with a neutral gate), else the gate's mean over calibration ``tokens`` (``mean``); ``one`` drops it.
* Layers without MoE keep their FFN. A dense config has one FFN width, so every layer gets the largest
  width and narrower FFNs are padded with zero neurons (act(0) * 0 = 0: exact; the padding is dead weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.densify.group import group_and_merge
from moekit.densify.scores import check_score, select_experts
from moekit.core.dense import dense_config, dense_model_type
from moekit.core.keys import DENSIFIED_KEY as CONFIG_KEY  # provenance in the dense config (plain transformers ignores it)
from moekit.core.registry import register
from moekit.errors import MoekitError
from moekit.profile.stats import ExpertStats

GROUPINGS = ("select", "merge")
DOWN_SCALINGS = ("uniform", "score")
SHARED_GATES = ("auto", "mean", "one")


@dataclass
class DensifyConfig:
    keep: int = 2  # experts per layer concatenated into the dense FFN
    score: str = "do-acp"  # sf | cp | acp | do-acp | reap | ean | random
    grouping: str = "select"  # select: drop the others; merge: fold them into the closest selected expert
    down_scaling: str = "uniform"  # uniform: 1/K; score: proportional to the experts' scores
    seed: int = 0  # for the random score
    fold_routed_mass: bool = True
    shared_gate: str = "auto"  # auto | mean | one (Qwen2-MoE's sigmoid-gated shared expert)

    def validate(self) -> None:
        check_score(self.score)
        if self.keep < 1:
            raise MoekitError(f"keep {self.keep} must be at least 1 expert per layer")
        for name, value, allowed in (("grouping", self.grouping, GROUPINGS), ("down scaling", self.down_scaling,
                                     DOWN_SCALINGS), ("shared gate", self.shared_gate, SHARED_GATES)):
            if value not in allowed:
                raise MoekitError(f"unknown {name} '{value}': use one of {', '.join(allowed)}")


@register("densify", DensifyConfig, needs=("stats",), uses=("tokens",), new_model=True)
@torch.no_grad()
def densify(model: nn.Module, cfg: DensifyConfig, *, stats: ExpertStats | None = None, tokens: torch.Tensor | None = None,
            teacher=None) -> nn.Module:
    """A new dense model built from ``model``'s K best experts per layer (``model`` is left untouched).

    ``tokens`` [n, L] are needed only to fold a learned Qwen2-MoE shared-expert gate (``shared_gate="mean"``).
    """
    if stats is None:
        raise MoekitError("densifying needs expert statistics: pass stats=moekit.profile.profile(model, tokens=...)")
    cfg.validate()
    layers = arch.require_moe(model)
    target = dense_model_type(model)
    stats.check_model(model)
    gates = _shared_gate_constants(model, layers, cfg, tokens)
    ffns, record = {}, {}
    for layer in tqdm(layers, desc="densify", leave=False):
        ffns[layer.index], record[str(layer.index)] = _dense_ffn(layer, stats, cfg, gates.get(layer.index, 1.0))
    for i, dl in enumerate(arch.decoder_layers(model)):
        if i not in ffns:
            m = dl.mlp
            ffns[i] = (m.gate_proj.weight.detach(), m.up_proj.weight.detach(), m.down_proj.weight.detach())
    width = max(g.shape[0] for g, _, _ in ffns.values())
    dense = _build_dense(model, dense_config(model, width), {i: _pad(f, width) for i, f in ffns.items()})
    setattr(dense.config, CONFIG_KEY, {"from": arch.model_type(model), "to": target, "keep": cfg.keep,
                                       "score": cfg.score, "grouping": cfg.grouping, "down_scaling": cfg.down_scaling,
                                       "layers": record})
    return dense


def _dense_ffn(layer: arch.MoELayer, stats: ExpertStats, cfg: DensifyConfig, shared_c: float):
    e = layer.num_experts
    selected, scores = select_experts(stats, layer.index, cfg.score, cfg.keep, num_experts=e, seed=cfg.seed)
    w = layer.expert_weights(copy=False)  # read only: the selected experts are indexed (copied) out of it
    if cfg.grouping == "merge":
        stats.require("rank_counts", what="merge grouping")
        counts = stats.get("rank_counts", layer.index).double().sum(1)
        gate, up, down, members = group_and_merge(w, selected, counts)
        group_scores = torch.stack([scores[m].sum() for m in members])
    else:
        idx = torch.tensor(selected)
        gate, up, down, members = w["gate"][idx], w["up"][idx], w["down"][idx], [[s] for s in selected]
        group_scores = scores[idx]
    a = _mix(group_scores, cfg.down_scaling)
    m = _routed_mass(layer, stats) if cfg.fold_routed_mass else 1.0
    k, i, h = gate.shape
    down = down.double() * (m * a)[:, None, None]
    g, u = gate.reshape(k * i, h), up.reshape(k * i, h)
    d = down.permute(1, 0, 2).reshape(h, k * i).to(gate.dtype)
    sh = layer.shared_expert
    if sh is not None:
        g = torch.cat([g, sh.gate_proj.weight.detach()])
        u = torch.cat([u, sh.up_proj.weight.detach()])
        d = torch.cat([d, (sh.down_proj.weight.detach().double() * shared_c).to(d.dtype)], dim=1)
    info = {"selected": selected, "groups": members, "down_scale": [round(float(x), 6) for x in m * a],
            "shared_gate": shared_c if sh is not None else None}
    return (g, u, d), info


def _mix(scores: torch.Tensor, how: str) -> torch.Tensor:
    k = scores.shape[0]
    uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if how == "uniform":
        return uniform
    s = scores.double().clamp_min(0)
    return s / s.sum() if s.sum() > 0 else uniform


def _routed_mass(layer: arch.MoELayer, stats: ExpertStats) -> float:
    """What the router's top-k weights sum to per token (on average)."""
    if layer.norm_topk_prob:
        return layer.routed_scaling_factor
    stats.require("weight_sum", "rank_counts", what="folding the routed mass (or pass fold_routed_mass=False)")
    tokens = float(stats.get("rank_counts", layer.index)[:, 0].sum())
    if tokens <= 0:
        raise MoekitError(f"layer {layer.index}: the statistics saw no tokens; profile on more data")
    return float(stats.get("weight_sum", layer.index).double().sum()) / tokens


def _shared_gate_constants(model, layers, cfg: DensifyConfig, tokens) -> dict[int, float]:
    """Per layer, the constant that replaces the shared expert's sigmoid gate (1.0 where there is none)."""
    gated = [la for la in layers if la.shared_gate is not None]
    if not gated or cfg.shared_gate == "one":
        return {}
    out = {}
    if cfg.shared_gate == "auto":
        for la in gated:
            if not bool(la.shared_gate.weight.detach().abs().max() > 0) and getattr(la.shared_gate, "bias", None) is None:
                out[la.index] = 0.5  # sigmoid(0): exact
    todo = [la for la in gated if la.index not in out]
    if todo:
        if tokens is None:
            raise MoekitError("this model's shared experts have learned sigmoid gates: pass calibration tokens "
                              "(--data) to fold their mean, or choose --shared-gate one")
        out.update(_mean_gates(model, todo, tokens))
    return out


def _mean_gates(model, layers, tokens: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    sums = {la.index: 0.0 for la in layers}
    count = [0]
    device = next(model.parameters()).device
    with Hooks() as hooks:
        for la in layers:
            def hook(_mod, _inp, out, idx=la.index):
                sums[idx] += float(torch.sigmoid(out.float()).sum())
            hooks.forward(la.shared_gate, hook)
        for b in tqdm(range(0, tokens.shape[0], batch_size), desc="shared gate mean", leave=False):
            batch = tokens[b : b + batch_size].to(device)
            model(batch)
            count[0] += batch.numel()
    return {i: s / max(count[0], 1) for i, s in sums.items()}


def _pad(ffn, width: int):
    g, u, d = ffn
    extra = width - g.shape[0]
    if extra == 0:
        return g, u, d
    zg = g.new_zeros(extra, g.shape[1])
    return torch.cat([g, zg]), torch.cat([u, zg]), torch.cat([d, d.new_zeros(d.shape[0], extra)], dim=1)


def dense_state(src: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], ffns: dict) -> dict[str, torch.Tensor]:
    """The dense model's tensors named in ``targets`` (name -> tensor of the wanted shape, e.g. on meta): each FFN
    projection from ``ffns[layer]``, everything else from the MoE's ``src`` under the same name (zeros for biases the
    MoE had none of; tied weights are left out). The layer-sequential path passes one layer's names at a time."""
    state = {}
    for key, target in targets.items():
        parts = key.split(".")
        if ".mlp." in key and parts[-2] in ("gate_proj", "up_proj", "down_proj"):
            layer_idx = int(parts[parts.index("layers") + 1])
            value = ffns[layer_idx][("gate_proj", "up_proj", "down_proj").index(parts[-2])]
        elif key in src:
            value = src[key]
        elif key.endswith("_proj.bias"):  # Qwen2's q/k/v biases when the MoE had none
            value = torch.zeros(target.shape)
        else:
            continue  # tied weights
        if tuple(value.shape) != tuple(target.shape):
            raise MoekitError(f"densify: '{key}' has shape {tuple(value.shape)}, the dense model wants "
                              f"{tuple(target.shape)}; this is a moekit bug")
        state[key] = value.detach()
    return state


def _build_dense(model, config, ffns: dict) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    ref = next(model.parameters())
    with init_empty_weights():
        dense = AutoModelForCausalLM.from_config(config, dtype=ref.dtype)
    state = dense_state(model.state_dict(), dense.state_dict(), ffns)
    state = {k: v.to(device=ref.device, dtype=ref.dtype).clone() for k, v in state.items()}
    missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(dense, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    if [k for k in missing if k not in tied] or unexpected:
        raise MoekitError(f"densify: dense weights incomplete (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                          "this is a moekit bug")
    dense.tie_weights()
    for name, t in list(dense.named_parameters()) + list(dense.named_buffers()):
        if t.is_meta:
            raise MoekitError(f"densify: tensor {name} was never filled; this is a moekit bug")
    if getattr(model, "generation_config", None) is not None:
        dense.generation_config = type(model.generation_config).from_dict(model.generation_config.to_dict())
    return dense.to(ref.device).eval()
