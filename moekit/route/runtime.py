"""What a re-routed model runs: the per-layer routing rule, its maths, and the patches that apply it.

A layer's rule is a :class:`LayerPlan` (what the config key ``moekit_route`` records per layer). :func:`install`
applies one to a layer: the router's top-k becomes the plan's slot count, and where the router's output needs
post-processing (``renorm``, ``adaptive``, ``super``, ``compensate``) the router's ``forward`` is replaced on the
instance by :class:`Rerouter`, which calls the class's own forward at the original K and then :func:`reroute`;
``compensate`` also wraps the experts' ``forward`` (:class:`Compensator`) with the dropped experts' mean outputs
held in a ``moekit_mean_out`` buffer. :func:`restore` re-applies the recorded plans after a load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.core import arch
from moekit.core.keys import MEAN_OUT, ROUTE_KEY
from moekit.errors import MoekitError


@dataclass
class LayerPlan:
    """One layer's routing rule (what ``moekit_route`` records per layer)."""

    K: int  # the original top-k
    k: int  # kept per token (fixed rule); slots the router returns
    renorm: bool = False  # kept weights scaled to the original top-K sum
    native_renorm: bool = False  # the router itself renormalises its top-k (norm_topk_prob, Mixtral, GPT-OSS)
    rule: str | None = None  # None (fixed k), "cumprob" or "beta"
    threshold: float = 0.0
    min_k: int = 1
    keep: list[int] = field(default_factory=list)  # super experts never dropped
    compensate: bool = False

    @property
    def slots(self) -> int:
        return self.K if self.rule else max(self.k, len(self.keep))

    @property
    def rerouted(self) -> bool:
        """Whether the router's output is post-processed (else the router's own top-k at ``k`` runs as is)."""
        return bool(self.renorm != self.native_renorm or self.rule or self.keep or self.compensate)


# ---------------------------------------------------------------------------------------------- routing maths
def ranked(layer: arch.MoELayer, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
    """A router's top-K in the router's own choice order, best first (DeepSeek-V3 returns them unsorted)."""
    key = layer.selection_scores(logits.reshape(-1, logits.shape[-1])).gather(1, indices)
    order = key.argsort(dim=-1, descending=True, stable=True)
    return weights.gather(-1, order), indices.gather(-1, order)


def keep_counts(weights_sorted: torch.Tensor, plan: LayerPlan, threshold: float | None = None) -> torch.Tensor:
    """How many of the ranked top-K experts each token keeps (before super experts are added)."""
    t = plan.threshold if threshold is None else threshold
    n_tok, big_k = weights_sorted.shape
    if plan.rule is None:
        return torch.full((n_tok,), plan.k, dtype=torch.long, device=weights_sorted.device)
    q = weights_sorted.float() / weights_sorted.float().sum(-1, keepdim=True).clamp_min(1e-20)
    if plan.rule == "cumprob":
        before = q.cumsum(-1) - q  # mass of the higher-ranked experts
        n = (before < t - 1e-7).sum(-1)
    elif plan.rule == "beta":
        n = (q >= t * q[:, :1]).sum(-1)
    else:
        raise MoekitError(f"unknown adaptive rule '{plan.rule}': use 'cumprob' or 'beta'")
    return n.clamp(min=min(plan.min_k, big_k), max=big_k)


def keep_mask(weights_sorted, indices_sorted, plan: LayerPlan, threshold: float | None = None) -> torch.Tensor:
    """Bool [T, K] over the ranked top-K: which experts stay."""
    n = keep_counts(weights_sorted, plan, threshold)
    rank = torch.arange(weights_sorted.shape[1], device=weights_sorted.device)
    if not plan.keep:
        return rank < n[:, None]
    is_super = torch.isin(indices_sorted, torch.tensor(plan.keep, device=indices_sorted.device))
    if plan.rule:  # adaptive: super experts come on top of the threshold's count
        return (rank < n[:, None]) | is_super
    # fixed k: super experts first, then the others by rank, k in all (more only if supers alone exceed k)
    priority = torch.where(is_super, rank - weights_sorted.shape[1], rank)
    pos = priority.argsort(-1).argsort(-1)
    n = torch.maximum(n, is_super.sum(-1))
    return pos < n[:, None]


def reroute(weights: torch.Tensor, indices: torch.Tensor, plan: LayerPlan, skip_index: int | None):
    """Post-process a router's ranked top-K (weights, indices; see :func:`ranked`) into ``plan.slots`` slots.

    Kept experts come first in rank order; unused slots point at ``skip_index`` (the expert count, which the
    experts' forward skips) or, where the forward cannot skip, repeat the token's first expert at weight 0.
    """
    w, i = weights, indices
    mask = keep_mask(w, i, plan)
    kept_w = torch.where(mask, w, torch.zeros_like(w))
    if plan.renorm:
        kept_w = kept_w * (w.sum(-1, keepdim=True) / kept_w.sum(-1, keepdim=True).clamp_min(1e-20))
    order = (~mask).to(torch.int8).argsort(dim=-1, stable=True)[:, : plan.slots]  # kept first, rank order kept
    out_w, out_i, out_m = kept_w.gather(-1, order), i.gather(-1, order), mask.gather(-1, order)
    filler = torch.full_like(out_i, skip_index) if skip_index is not None else out_i[:, :1].expand_as(out_i)
    return out_w.masked_fill(~out_m, 0.0).to(weights.dtype), torch.where(out_m, out_i, filler)


def dropped_weights(weights, indices, kept_indices, num_experts: int) -> torch.Tensor:
    """Dense [T, E]: the original top-K weight of every expert that the kept routing no longer runs."""
    dense = torch.zeros(weights.shape[0], num_experts + 1, dtype=torch.float32, device=weights.device)
    dense.scatter_(1, indices.clamp(max=num_experts), weights.float())  # zero experts (index >= E) are never dropped
    kept = torch.zeros_like(dense).scatter_(1, kept_indices.clamp(max=num_experts), 1.0)
    return (dense * (1 - kept))[:, :num_experts]


# ---------------------------------------------------------------------------------------------- module patches
class Rerouter:
    """Replaces ``router.forward`` on the instance: the router's own forward at K, then :func:`reroute`."""

    def __init__(self, layer: arch.MoELayer, plan: LayerPlan):
        self.layer, self.plan = layer, plan

    def __call__(self, hidden_states, *extra):  # extra: a block-held selection bias (router_extra_args)
        logits, w, i = router_at(self.layer, self.plan.K, hidden_states)
        w, i = reroute(*ranked(self.layer, logits, w, i), self.plan, self.layer.skip_index)
        return self.layer.router_output(logits, w, i)  # in the router's own form (Llama-4: scores, logits)


class Compensator:
    """Replaces ``experts.forward`` on the instance: the kept experts' output plus sum_dropped g_e * mu_e."""

    def __init__(self, layer: arch.MoELayer, plan: LayerPlan):
        self.layer, self.plan = layer, plan

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        experts = self.layer.experts
        out = type(experts).forward(experts, hidden_states, top_k_index, top_k_weights)
        _, w, i = router_at(self.layer, self.plan.K, hidden_states)  # the original top-K, recomputed
        mu = getattr(experts, MEAN_OUT)
        kept = top_k_index
        if self.layer.zero_experts_in_block:  # LongCat-Flash, 5.25: its block sent the zero experts' slots to dummy
            kept = kept.masked_fill(top_k_weights == 0, mu.shape[0])  # real experts at weight 0: they kept nothing
        drop = dropped_weights(w, i, kept, mu.shape[0])
        return out + (drop @ mu.float()).to(out.dtype)


def router_at(layer: arch.MoELayer, big_k: int, hidden_states):
    """The router class's own forward at top-k ``big_k`` (bypassing any instance patch), as (logits, weights,
    indices) (:meth:`MoELayer.routing`)."""
    router = layer.router
    slots, router.top_k = router.top_k, big_k
    try:
        return layer.routing(type(router).forward(router, layer.router_input(hidden_states), *layer.router_extra_args()))
    finally:
        router.top_k = slots


def install(layer: arch.MoELayer, plan: LayerPlan, mean_out: torch.Tensor | None = None) -> None:
    """Apply ``plan`` to one layer (idempotent: a previous patch is replaced; a stored mean output is kept)."""
    if plan.compensate and layer.weights_scale_input:
        raise MoekitError(f"layer {layer.index}: compensation is not available for {layer.family.name}: its experts "
                          "take router-scaled inputs with no routing arguments (the Compensator wraps a "
                          "forward(x, indices, weights)); route without 'compensate'")
    uninstall(layer)
    layer.router.top_k = plan.slots
    if hasattr(layer.block, "top_k"):
        layer.block.top_k = plan.slots
    if plan.rerouted:
        layer.router.forward = Rerouter(layer, plan)
    if plan.compensate:
        if mean_out is None:
            mean_out = getattr(layer.experts, MEAN_OUT, None)
        if mean_out is None:
            raise MoekitError(f"layer {layer.index}: compensation needs the experts' mean outputs; profile the model")
        ref = layer.experts.down_proj
        layer.experts.register_buffer(MEAN_OUT, mean_out.to(device=ref.device, dtype=ref.dtype).contiguous())
        layer.experts.forward = Compensator(layer, plan)


def uninstall(layer: arch.MoELayer) -> None:
    """Remove the forward patches (the router's top-k and any ``moekit_mean_out`` buffer stay)."""
    for module in (layer.router, layer.experts):
        if "forward" in vars(module):
            del module.forward


def is_routed(model) -> bool:
    return bool(getattr(model.config, ROUTE_KEY, None))


def restore(model) -> None:
    """Re-apply ``moekit_route`` from the config after loading (by ``moekit.checkpoint.read.restore_moekit_state``)."""
    record = getattr(model.config, ROUTE_KEY, None) or {}
    for layer in arch.moe_layers(model):
        spec = record.get(str(layer.index))
        if spec:
            install(layer, LayerPlan(**spec))

