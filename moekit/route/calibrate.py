"""What routing measures on calibration tokens: block inputs, routed outputs, and the calibrations built on them.

:class:`BlockInputs` captures what enters each MoE block (and the residual-stream norm there); on those inputs
:func:`sensitivity` measures each layer's output error at every k (for :func:`allocate`), :func:`rescale_factor`
the per-layer constant of ``rescale``, and :func:`calibrate_adaptive` the adaptive threshold that meets the budget
(:func:`calibrate_threshold`). :func:`measure_active` counts the experts a routed model actually runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.core.keys import MEAN_OUT
from moekit.errors import MoekitError
from moekit.route.runtime import (
    LayerPlan,
    dropped_weights,
    install,
    keep_mask,
    ranked,
    reroute,
    router_at,
    uninstall,
)


class BlockInputs:
    """Capture, per MoE layer, the tokens entering the block [T, H] and each token's residual-stream squared norm [T]."""

    def __init__(self, model, layers: list[arch.MoELayer]):
        self.model, self.layers = model, layers
        self.x: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
        self.resid: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, batch_size: int = 4) -> BlockInputs:
        decoder = arch.decoder_layers(self.model)
        device = next(self.model.parameters()).device
        with Hooks() as hooks:
            for layer in self.layers:
                hooks.pre(layer.block, self._block_hook(layer.index))
                hooks.pre(decoder[layer.index], self._resid_hook(layer.index), with_kwargs=True)
            for s in tqdm(range(0, tokens.shape[0], batch_size), desc="calibration", leave=False):
                self.model(tokens[s : s + batch_size].to(device), use_cache=False)
        return self

    def _block_hook(self, idx):
        def hook(_module, args):
            x = args[0]
            self.x[idx].append(x.reshape(-1, x.shape[-1]).detach())
        return hook

    def _resid_hook(self, idx):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.resid[idx].append(h.float().pow(2).sum(-1).reshape(-1).detach())
        return hook

    def get(self, idx: int) -> torch.Tensor:
        return torch.cat(self.x[idx])

    def resid_norms(self, idx: int) -> torch.Tensor:
        return torch.cat(self.resid[idx])


def routed_output(layer: arch.MoELayer, x: torch.Tensor, plan: LayerPlan | None, full=None) -> torch.Tensor:
    """Routed part of the block's output on x [T, H] under ``plan`` (None: the original top-K), no shared expert."""
    if full is None:
        full = full_routing(layer, x, plan.K if plan else layer.top_k)
    w, i = full
    if plan is None:
        return layer.combine(x, w, i)
    w2, i2 = plan_routing(layer, plan, x, full)
    out = layer.combine(x, w2, i2)
    if plan.compensate:
        mu = getattr(layer.experts, MEAN_OUT)
        out = out + (dropped_weights(w, i, i2, mu.shape[0]) @ mu.float()).to(out.dtype)
    return out


@torch.no_grad()
def plan_routing(layer: arch.MoELayer, plan: LayerPlan, x: torch.Tensor, full):
    """(weights, indices) the layer runs under ``plan``; ``full`` is the original top-K routing of x."""
    if plan.rerouted:
        return reroute(*full, plan, layer.skip_index)
    _, w, i = router_at(layer, plan.k, x)
    return w, i


@torch.no_grad()
def full_routing(layer: arch.MoELayer, x: torch.Tensor, big_k: int):
    """(weights, indices) of the router's own top-``big_k`` on x, ranked (see :func:`ranked`)."""
    return ranked(layer, *router_at(layer, big_k, x))


def allocate(errors: dict[int, list[float]], big_k: dict[int, int], total: int, min_k: int) -> dict[int, int]:
    """Greedy: start every layer at K, lower the layer whose error grows least, until the k's sum to ``total``.

    ``errors[l][k]`` is layer l's error at k kept experts (index 0 unused)."""
    ks = dict(big_k)
    while sum(ks.values()) > total:
        options = [(errors[idx][ks[idx] - 1] - errors[idx][ks[idx]], idx) for idx in ks if ks[idx] > min_k]
        if not options:
            raise MoekitError(f"a budget of {total} experts over {len(ks)} layers is below min_k={min_k} per layer")
        _, best = min(options)
        ks[best] -= 1
    return ks


def calibrate_threshold(routings: list, plans: list[LayerPlan], budget: float) -> float:
    """Bisection on the adaptive threshold so that the average kept count over layers and tokens is ``budget``."""
    rule = plans[0].rule

    def avg(t: float) -> float:
        kept = sum(int(keep_mask(w, i, p, t).sum()) for (w, i), p in zip(routings, plans, strict=True))
        return kept / sum(w.shape[0] for w, _ in routings)

    lo, hi = 0.0, 1.0  # cumprob: count grows with t; beta: count shrinks with t
    for _ in range(40):
        mid = (lo + hi) / 2
        too_many = avg(mid) > budget
        if (rule == "cumprob") == too_many:
            hi = mid
        else:
            lo = mid
    candidates = [lo, hi]
    return min(candidates, key=lambda t: abs(avg(t) - budget))


def sensitivity(layers, plans, inputs: BlockInputs) -> dict[int, list[float]]:
    """errors[l][k] = mean over calibration tokens of ||y_K - y_k||^2 / ||residual||^2, under the other mitigations.

    Per token, not pooled: a few attention-sink tokens carry massive activations (norms in the thousands) from
    the super experts' layer on, and a pooled ratio let them swamp every later layer's error, which sent those
    layers to k = 1 (perplexity 84 -> 8708 on smollm2-moe)."""
    out = {}
    for layer in tqdm(layers, desc="sensitivity", leave=False):
        x = inputs.get(layer.index)
        plan = plans[layer.index]
        full = full_routing(layer, x, plan.K)
        ref = layer.combine(x, *full).float()
        resid = inputs.resid_norms(layer.index).to(ref.device).clamp_min(1e-12)
        errs = [math.inf]
        for k in range(1, plan.K + 1):
            trial = LayerPlan(**{**asdict(plan), "k": k})
            y = routed_output(layer, x, trial, full).float()
            errs.append(float(((y - ref).pow(2).sum(-1) / resid).mean()))
        out[layer.index] = errs
    return out


def calibrate_adaptive(model, layers, plans, budget: float, rounds: int, inputs: BlockInputs, tokens) -> None:
    """Set every adaptive plan's threshold so that the average kept count is ``budget``; after the first of
    ``rounds`` calibrations, the hidden states are re-measured on the re-routed model."""
    adaptive = [plans[layer.index] for layer in layers]
    for round_ in range(max(1, rounds)):
        if round_ > 0:  # hidden states of the re-routed model, then calibrate again
            for layer in layers:
                install(layer, plans[layer.index])
            inputs = BlockInputs(model, layers).run(tokens)
            for layer in layers:
                uninstall(layer)
                layer.router.top_k = plans[layer.index].K
        routings = [full_routing(layer, inputs.get(layer.index), plans[layer.index].K) for layer in layers]
        t = calibrate_threshold(routings, adaptive, budget)
        for p in adaptive:
            p.threshold = t


def rescale_factor(layer, plan: LayerPlan, x: torch.Tensor, mode: str) -> float:
    """Per-layer constant for the kept experts' output (compensation, if any, is not scaled)."""
    full = full_routing(layer, x, plan.K)
    target = layer.combine(x, *full).float()
    w2, i2 = plan_routing(layer, plan, x, full)
    kept = layer.combine(x, w2, i2).float()
    if plan.compensate:
        mu = getattr(layer.experts, MEAN_OUT)
        target = target - dropped_weights(*full, i2, mu.shape[0]) @ mu.float()
    if mode == "lsq":
        return float((target * kept).sum() / kept.pow(2).sum().clamp_min(1e-20))
    return float(target.pow(2).sum().sqrt() / kept.pow(2).sum().sqrt().clamp_min(1e-20))


class ActiveCounter:
    """Context manager counting the routed experts actually run per token, per MoE layer (router hooks)."""

    def __init__(self, model):
        self.layers = arch.moe_layers(model)
        self.counts = {layer.index: [0, 0] for layer in self.layers}
        self.hooks = Hooks()

    def __enter__(self) -> ActiveCounter:
        for layer in self.layers:
            self.hooks.forward(layer.router, self._hook(layer))
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove()

    def _hook(self, layer):
        def hook(_module, _args, out):
            _, w, i = layer.routing(out)
            self.counts[layer.index][0] += int(((i < layer.num_experts) & (w != 0)).sum())
            self.counts[layer.index][1] += int(i.shape[0])
        return hook

    def result(self) -> dict:
        per_layer = {idx: a / max(n, 1) for idx, (a, n) in self.counts.items()}
        return {"average": sum(per_layer.values()) / len(per_layer), "per_layer": per_layer,
                "tokens": int(next(iter(self.counts.values()))[1])}


@torch.no_grad()
def measure_active(model, tokens: torch.Tensor, batch_size: int = 4) -> dict:
    """Average routed experts actually run per token on ``tokens``, per MoE layer and overall."""
    device = next(model.parameters()).device
    with ActiveCounter(model) as counter:
        for s in tqdm(range(0, tokens.shape[0], batch_size), desc="measure k", leave=False):
            model(tokens[s : s + batch_size].to(device), use_cache=False)
    return counter.result()
