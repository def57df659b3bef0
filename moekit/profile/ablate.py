"""Expert ablation: skip chosen experts when routed and measure what breaks.

As in "Unveiling Super Experts in Mixture-of-Experts LLMs" (arXiv 2507.23279): an ablated expert's
contribution is zeroed where the router picks it, and the other selected experts keep their weights
(no renormalisation). :func:`ablate` reports perplexity before/after and the attention-sink decay rate
per layer, D_sink = 1 - mean over heads of (attention on the first token after / before).
"""

from __future__ import annotations

import math
import random
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from moekit.core.arch import decoder_layers, require_moe
from moekit.core.hooks import Hooks
from moekit.errors import MoekitError
from moekit.profile.observe import ModelAccumulator, eager_attention, observe_model

Pair = tuple[int, int]


def parse_experts(text: str) -> list[Pair]:
    """``"1,5;3,0"`` -> [(1, 5), (3, 0)] (decoder layer, expert)."""
    out = []
    for part in (p.strip() for p in str(text).split(";")):
        if not part:
            continue
        try:
            layer, expert = (int(v) for v in part.split(","))
        except ValueError:
            raise MoekitError(f"cannot read expert '{part}': write experts as 'LAYER,EXPERT;LAYER,EXPERT' (e.g. '1,5;3,0')") from None
        out.append((layer, expert))
    if not out:
        raise MoekitError("no experts given: write them as 'LAYER,EXPERT;LAYER,EXPERT' (e.g. '1,5;3,0')")
    return out


def check_experts(model, experts: list[Pair]) -> dict[int, list[int]]:
    """Validate (layer, expert) pairs against the model; returns {layer: [experts]}."""
    layers = {layer.index: layer for layer in require_moe(model)}
    by_layer: dict[int, list[int]] = {}
    for li, e in experts:
        if li not in layers:
            raise MoekitError(f"layer {li} is not an MoE layer of this model (MoE layers: {sorted(layers)})")
        if not 0 <= e < layers[li].num_experts:
            raise MoekitError(f"layer {li} has experts 0..{layers[li].num_experts - 1}; there is no expert {e}")
        by_layer.setdefault(li, []).append(e)
    return by_layer


def random_experts(model, n: int, *, seed: int = 0, exclude: list[Pair] = ()) -> list[Pair]:
    """``n`` (layer, expert) pairs drawn uniformly from all routed experts, avoiding ``exclude``."""
    pool = [(layer.index, e) for layer in require_moe(model) for e in range(layer.num_experts)]
    pool = [p for p in pool if p not in set(exclude)]
    if n < 1 or n > len(pool):
        raise MoekitError(f"--random {n}: choose between 1 and {len(pool)} experts")
    return sorted(random.Random(seed).sample(pool, n))


@contextmanager
def ablated(model, experts: list[Pair]):
    """Inside: the given experts contribute nothing where routed (routing weight zeroed, no renormalisation)."""
    by_layer = check_experts(model, experts)
    hooks = Hooks()
    for layer in require_moe(model):
        if layer.index not in by_layer:
            continue

        # the experts as a list: the layer-sequential mode hooks a model whose weights are still on the meta device
        def hook(module, inputs, output, dead=by_layer[layer.index], layer=layer):
            logits, weights, indices = layer.routing(output)  # Llama-4's router output translated both ways
            keep = ~torch.isin(indices, torch.tensor(dead, device=indices.device))
            return (*layer.router_output(logits, weights * keep.to(weights.dtype), indices), *output[3:])

        hooks.forward(layer.router, hook)
    try:
        yield
    finally:
        hooks.remove()


@dataclass
class AblationResult:
    experts: list[Pair]
    ppl_before: float
    ppl_after: float
    sink_before: list[list[float]]  # [L][A] mean attention on the first token
    sink_after: list[list[float]]
    d_sink: list[float]  # per decoder layer

    def as_dict(self) -> dict:
        return dict(self.__dict__, experts=[list(p) for p in self.experts])


@torch.no_grad()
def measure(model, tokens: torch.Tensor, *, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"):
    """Perplexity and attention mass on the first token [L, A], from the same forward passes."""
    from moekit.eval.perplexity import perplexity

    heads = int(getattr(model.config, "num_attention_heads", 0) or 0)
    acc = ModelAccumulator(len(decoder_layers(model)), next(model.parameters()).device, attn_sink=True, num_heads=heads)
    with ExitStack() as stack:
        stack.enter_context(eager_attention(model))
        stack.enter_context(observe_model(model, acc))
        ppl = perplexity(model, tokens, batch_size=batch_size, progress=progress, desc=desc)
    return ppl, acc.results()["attn_sink"].cpu()


@torch.no_grad()
def measure_sequential(path, tokens: torch.Tensor, experts: list[Pair] | None = None, *, batch_size: int = 4,
                       progress: bool = True, device=None, dtype=None, desc: str = "perplexity") -> tuple[float, torch.Tensor]:
    """:func:`measure` of the checkpoint at ``path``, one decoder layer in memory at a time (with ``experts``
    skipped where routed)."""
    from moekit.sequential.engine import LayerSequential

    engine = LayerSequential(path, tokens, device=device, dtype=dtype, batch_size=batch_size, progress=progress,
                             desc=f"{desc} (layer-sequential)", attention="eager")
    require_moe(engine.model)
    heads = int(getattr(engine.model.config, "num_attention_heads", 0) or 0)  # as measure() counts them
    acc = ModelAccumulator(len(engine.layers), engine.device, attn_sink=True, num_heads=heads)
    with ExitStack() as stack:
        if experts:
            stack.enter_context(ablated(engine.model, experts))
        for layer in engine:
            with observe_model(engine.model, acc, offset=layer.index, layers=[layer.module]):
                layer.forward()
    nll, count = engine.nll(tokens)
    return math.exp(nll / count), acc.results()["attn_sink"].cpu()


def sink_decay(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """D_sink per layer: 1 - mean over heads of after / before."""
    return 1 - (after / before.clamp_min(1e-12)).mean(dim=-1)


def ablate(model, tokens: torch.Tensor, experts: list[Pair], *, batch_size: int = 4, progress: bool = True,
           baseline: tuple[float, torch.Tensor] | None = None) -> AblationResult:
    """Perplexity and attention-sink decay with ``experts`` skipped; ``baseline`` reuses an earlier :func:`measure`."""
    check_experts(model, experts)
    ppl0, sink0 = baseline if baseline is not None else measure(model, tokens, batch_size=batch_size, progress=progress,
                                                                  desc="ppl (intact)")
    with ablated(model, experts):
        ppl1, sink1 = measure(model, tokens, batch_size=batch_size, progress=progress, desc="ppl (ablated)")
    return _result(experts, (ppl0, sink0), (ppl1, sink1))


def ablate_sequential(path, tokens: torch.Tensor, experts: list[Pair], *, batch_size: int = 4, progress: bool = True,
                      baseline: tuple[float, torch.Tensor] | None = None, device=None, dtype=None) -> AblationResult:
    """:func:`ablate` of the checkpoint at ``path``, one decoder layer at a time (``baseline``: an earlier
    :func:`measure_sequential`)."""
    kw = dict(batch_size=batch_size, progress=progress, device=device, dtype=dtype)
    before = baseline if baseline is not None else measure_sequential(path, tokens, desc="ppl (intact)", **kw)
    return _result(experts, before, measure_sequential(path, tokens, experts, desc="ppl (ablated)", **kw))


def _result(experts: list[Pair], before: tuple[float, torch.Tensor], after: tuple[float, torch.Tensor]) -> AblationResult:
    (ppl0, sink0), (ppl1, sink1) = before, after
    d = sink_decay(sink0, sink1)
    return AblationResult(sorted(experts), ppl0, ppl1, sink0.tolist(), sink1.tolist(),
                          [0.0 if math.isnan(v) else float(v) for v in d.tolist()])
