"""Fewer activated experts per token, and training-free ways to win the accuracy back.

``route_(model, stats, RouteConfig(top_k=k, mitigations=(...)), tokens=calib)`` lowers the number of
routed experts each token activates, in place, and returns a report with the average measured.

Plain reduction is the router's own top-k at a smaller k: a standard checkpoint when k is global
(``num_experts_per_tok``), moekit's opt-in per-layer key ``moekit_top_k_per_layer`` otherwise.
Mitigations (training-free, combinable):

``renorm``      scale each token's kept weights so they sum to what its original top-K weights summed to (what a
                router with ``norm_topk_prob`` already does, and what moekit then keeps doing for every rule).
``rescale``     one constant per layer (``rescale_mode``: "norm" matches the RMS of the original top-K
                routed output on calibration tokens, "lsq" is the least-squares scalar), folded into the
                experts' down projections: the weights stay standard.
``compensate``  kept experts keep their original top-K weights, and the dropped ranks k+1..K add
                sum g_e * mu_e, mu_e = weighted_out / weight_sum from the profile (the expert's routing-weighted
                mean output; MoNE-like). No dropped expert runs.
``allocate``    spread a fixed average k over the layers by measured sensitivity: the MoE-block output error on
                calibration hidden states when a layer's k drops, relative to the residual stream, greedily.
``adaptive``    per-token k: keep experts until the cumulative normalised top-K weight reaches a threshold
                (``adaptive_rule="cumprob"``) or keep those whose weight is at least beta x the top weight
                (``"beta"``, NAEE's dynamic skipping); the threshold is set so the average k is the budget.
``super``       a super expert (from the statistics file) that the original top-K selected is never dropped.

``keep_weights=True`` (CLI ``--keep-weights``) stops a router that renormalises its own top-k (``norm_topk_prob``,
Mixtral, GPT-OSS) from renormalising over the kept experts: they keep the weights they had among the original
top-K, so a token left with one expert does not hand it the whole weight (needs moekit's loader).

Measured on smollm2-moe (K=8 of 24, 30 layers; first 8,192 tokens of the C4 dev file, 4,096 calibration tokens;
bench/route_table.py): original 87.7, plain top-4 231.9; ``rescale`` (lsq) 138.4 (65% of the loss back, standard
checkpoint), ``compensate`` 166.4 (45%), ``allocate`` alone 253.3, ``allocate`` + ``rescale`` 116.6 (80%, the best;
needs moekit's loader). ``adaptive`` with the ``beta`` rule breaks this model (4321): its router renormalises,
so a token left with one expert gives it all the weight; with ``keep_weights`` it scores 156.1, and
``keep_weights`` alone (no calibration at all) 145.4 (60% back).

How it runs: the router keeps its own maths. ``renorm``/``adaptive``/``super`` replace the router's ``forward``
on the instance by :class:`Rerouter`, which calls the class's forward at the original K and post-processes the
weights and indices; ``compensate`` wraps the experts' ``forward`` on the instance (:class:`Compensator`),
with the means as a ``moekit_mean_out`` buffer. What a checkpoint needs:

==========================================  ===========================================================
form                                        loads with
==========================================  ===========================================================
global top-k, with or without ``rescale``   plain transformers (standard checkpoint)
per-layer top-k (``allocate``)              moekit (plain transformers would run the largest k everywhere)
``renorm`` / ``adaptive`` / ``super``       moekit: config key ``moekit_route``, re-applied on load
``compensate``                              moekit: ``moekit_mean_out`` buffers in ``moekit-model.safetensors``
==========================================  ===========================================================
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.keys import MEAN_OUT, ROUTE_KEY
from moekit.errors import MoekitError
from moekit.profile.stats import ExpertStats, super_experts

MITIGATIONS = ("renorm", "rescale", "compensate", "allocate", "adaptive", "super")


@dataclass
class RouteConfig:
    """What to route. ``top_k`` is the budget: routed experts per token per layer, on average."""

    top_k: float | None = None
    top_k_per_layer: dict[int, int] | None = None  # explicit k per decoder layer (overrides top_k)
    mitigations: tuple[str, ...] = ()
    rescale_mode: str = "lsq"  # "lsq" (measured best) | "norm"
    adaptive_rule: str = "cumprob"  # "cumprob" | "beta"
    threshold: float | None = None  # adaptive threshold; None -> calibrated so the average k equals top_k
    min_k: int = 1  # adaptive and allocate never go below this
    super_rule: str = "paper"  # rule of moekit.stats.super_experts
    super_list: list[tuple[int, int]] | None = None  # explicit (layer, expert) super experts
    calibration_rounds: int = 2  # adaptive: re-measure on the re-routed model and re-calibrate
    keep_weights: bool = False  # kept experts keep their original top-K weights even where the router renormalises


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
    dense.scatter_(1, indices, weights.float())
    kept = torch.zeros_like(dense).scatter_(1, kept_indices.clamp(max=num_experts), 1.0)
    return (dense * (1 - kept))[:, :num_experts]


# ---------------------------------------------------------------------------------------------- module patches
class Rerouter:
    """Replaces ``router.forward`` on the instance: the router's own forward at K, then :func:`reroute`."""

    def __init__(self, layer: arch.MoELayer, plan: LayerPlan):
        self.layer, self.plan = layer, plan

    def __call__(self, hidden_states):
        logits, w, i = router_at(self.layer.router, self.plan.K, hidden_states)
        w, i = reroute(*ranked(self.layer, logits, w, i), self.plan, self.layer.skip_index)
        return logits, w, i


class Compensator:
    """Replaces ``experts.forward`` on the instance: the kept experts' output plus sum_dropped g_e * mu_e."""

    def __init__(self, layer: arch.MoELayer, plan: LayerPlan):
        self.layer, self.plan = layer, plan

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        experts = self.layer.experts
        out = type(experts).forward(experts, hidden_states, top_k_index, top_k_weights)
        _, w, i = router_at(self.layer.router, self.plan.K, hidden_states)  # the original top-K, recomputed
        mu = getattr(experts, MEAN_OUT)
        drop = dropped_weights(w, i, top_k_index, mu.shape[0])
        return out + (drop @ mu.float()).to(out.dtype)


def router_at(router, big_k: int, hidden_states):
    """The router class's own forward at top-k ``big_k`` (bypassing any instance patch)."""
    slots, router.top_k = router.top_k, big_k
    try:
        return type(router).forward(router, hidden_states)
    finally:
        router.top_k = slots


def install(layer: arch.MoELayer, plan: LayerPlan, mean_out: torch.Tensor | None = None) -> None:
    """Apply ``plan`` to one layer (idempotent: a previous patch is replaced; a stored mean output is kept)."""
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
    """Re-apply ``moekit_route`` from the config after loading (called by ``moekit.models.restore_moekit_state``)."""
    record = getattr(model.config, ROUTE_KEY, None) or {}
    for layer in arch.moe_layers(model):
        spec = record.get(str(layer.index))
        if spec:
            install(layer, LayerPlan(**spec))


# ---------------------------------------------------------------------------------------------- calibration
class BlockInputs:
    """Capture, per MoE layer, the tokens entering the block [T, H] and each token's residual-stream squared norm [T]."""

    def __init__(self, model, layers: list[arch.MoELayer]):
        self.model, self.layers = model, layers
        self.x: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
        self.resid: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, batch_size: int = 4) -> BlockInputs:
        hooks = []
        decoder = arch.decoder_layers(self.model)
        for layer in self.layers:
            hooks.append(layer.block.register_forward_pre_hook(self._block_hook(layer.index)))
            hooks.append(decoder[layer.index].register_forward_pre_hook(self._resid_hook(layer.index), with_kwargs=True))
        device = next(self.model.parameters()).device
        try:
            for s in tqdm(range(0, tokens.shape[0], batch_size), desc="calibration", leave=False):
                self.model(tokens[s : s + batch_size].to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
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
    _, w, i = router_at(layer.router, plan.k, x)
    return w, i


@torch.no_grad()
def full_routing(layer: arch.MoELayer, x: torch.Tensor, big_k: int):
    """(weights, indices) of the router's own top-``big_k`` on x, ranked (see :func:`ranked`)."""
    return ranked(layer, *router_at(layer.router, big_k, x))


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


# ---------------------------------------------------------------------------------------------- the verb
@torch.no_grad()
def route_(model, stats: ExpertStats | None, cfg: RouteConfig, tokens: torch.Tensor | None = None) -> dict:
    """Re-route ``model`` in place; return a report (per-layer k, mitigations, measured average k, compute saved).

    ``stats`` (the profile) is needed by ``compensate`` and ``super``; ``tokens`` [n, L] (calibration text) by
    ``rescale``, ``allocate`` and a calibrated ``adaptive`` threshold, and to measure the average k."""
    layers = arch.require_moe(model)
    mits = _check(cfg, layers, stats, tokens)
    if is_routed(model):
        raise MoekitError("this model is already re-routed (config has moekit_route); load the original model first")
    if stats is not None and ({"compensate", "super"} & mits):
        stats.check_model(model)
    big_k = {layer.index: layer.top_k for layer in layers}
    before = arch.param_counts(model)

    needs_inputs = bool({"rescale", "allocate"} & mits) or ("adaptive" in mits and cfg.threshold is None)
    inputs = BlockInputs(model, layers).run(tokens) if needs_inputs else None

    plans = {layer.index: _base_plan(layer, cfg, mits, stats) for layer in layers}
    means = {layer.index: _mean_out(stats, layer) for layer in layers} if "compensate" in mits else {}
    for layer in layers:  # means live on the experts so that routed_output() can use them during calibration
        if layer.index in means:
            layer.experts.register_buffer(MEAN_OUT, means[layer.index].to(layer.experts.down_proj))

    errors = {}
    if "allocate" in mits:
        errors = _sensitivity(layers, plans, inputs)
        total = int(round(cfg.top_k * len(layers)))
        ks = allocate(errors, big_k, total, max(1, cfg.min_k))
        for idx, k in ks.items():
            plans[idx].k = k

    if "adaptive" in mits:
        _calibrate_adaptive(model, layers, plans, cfg, inputs, tokens)

    scales = {}
    if "rescale" in mits:
        scales = {layer.index: _rescale(layer, plans[layer.index], inputs.get(layer.index), cfg.rescale_mode)
                  for layer in layers}

    for layer in layers:
        plan = plans[layer.index]
        install(layer, plan, means.get(layer.index))
        if layer.index in scales:
            _scale_experts(layer, scales[layer.index])
    arch.sync_config(model)
    record = {str(i): asdict(p) for i, p in plans.items() if p.rerouted}
    if record:
        setattr(model.config, ROUTE_KEY, record)

    measured = measure_active(model, tokens) if tokens is not None else None
    return _report(model, layers, plans, big_k, before, measured, scales, errors, cfg, mits)


def _check(cfg: RouteConfig, layers, stats, tokens) -> set[str]:
    mits = set(cfg.mitigations)
    unknown = mits - set(MITIGATIONS)
    if unknown:
        raise MoekitError(f"unknown mitigation(s) {sorted(unknown)}: choose from {', '.join(MITIGATIONS)}")
    if cfg.top_k is None and not cfg.top_k_per_layer:
        raise MoekitError("no budget: give top_k (experts per token) or top_k_per_layer")
    if {"allocate", "adaptive"} <= mits:
        raise MoekitError("allocate and adaptive both set the per-layer budget: choose one of them")
    if cfg.top_k_per_layer and ({"allocate", "adaptive"} & mits):
        raise MoekitError("top_k_per_layer fixes each layer's k: drop 'allocate' / 'adaptive' or drop top_k_per_layer")
    max_k = min(layer.top_k for layer in layers)
    if cfg.top_k is not None and not cfg.top_k_per_layer:
        if not (cfg.min_k <= cfg.top_k <= max_k if "adaptive" in mits else 1 <= cfg.top_k <= max_k):
            raise MoekitError(f"top_k {cfg.top_k} must be between 1 and the model's top-k {max_k}")
        if not ({"allocate", "adaptive"} & mits) and cfg.top_k != int(cfg.top_k):
            raise MoekitError(f"top_k {cfg.top_k} is fractional: only 'allocate' or 'adaptive' reach a fractional average")
    if cfg.top_k_per_layer:
        known = {layer.index: layer.top_k for layer in layers}
        for idx, k in cfg.top_k_per_layer.items():
            if int(idx) not in known:
                raise MoekitError(f"layer {idx} is not an MoE layer: MoE layers are {sorted(known)}")
            if not 1 <= int(k) <= known[int(idx)]:
                raise MoekitError(f"layer {idx}: top_k {k} must be between 1 and its top-k {known[int(idx)]}")
    if stats is None and ("compensate" in mits or ("super" in mits and cfg.super_list is None)):
        raise MoekitError("'compensate' and 'super' need the profile's statistics: pass --stats (run `moekit profile`)")
    needs_tokens = bool({"rescale", "allocate"} & mits) or ("adaptive" in mits and cfg.threshold is None)
    if needs_tokens and tokens is None:
        raise MoekitError("rescale, allocate and a calibrated adaptive threshold need calibration text: pass --data")
    if cfg.rescale_mode not in ("norm", "lsq"):
        raise MoekitError(f"unknown rescale_mode '{cfg.rescale_mode}': use 'norm' or 'lsq'")
    if cfg.adaptive_rule not in ("cumprob", "beta"):
        raise MoekitError(f"unknown adaptive_rule '{cfg.adaptive_rule}': use 'cumprob' or 'beta'")
    if cfg.keep_weights and "renorm" in mits:
        raise MoekitError("keep_weights keeps the original top-K weights and 'renorm' rescales them: choose one")
    return mits


def _base_plan(layer, cfg: RouteConfig, mits: set[str], stats) -> LayerPlan:
    big_k = layer.top_k
    if cfg.top_k_per_layer:
        k = int(cfg.top_k_per_layer.get(layer.index, cfg.top_k_per_layer.get(str(layer.index), big_k)))
    else:
        k = int(cfg.top_k) if "adaptive" not in mits and "allocate" not in mits else big_k
    keep = []
    if "super" in mits:
        pairs = cfg.super_list if cfg.super_list is not None else super_experts(stats, rule=cfg.super_rule)
        keep = sorted({int(e) for lay, e in pairs if int(lay) == layer.index})
    # a router that renormalises its own top-k keeps doing so for the kept experts, unless compensation takes the
    # dropped weight or keep_weights is set (then kept experts keep their original top-K weights)
    native = layer.norm_topk_prob
    renorm = "renorm" in mits or (native and "compensate" not in mits and not cfg.keep_weights)
    return LayerPlan(
        K=big_k, k=k, renorm=renorm, native_renorm=native, rule=cfg.adaptive_rule if "adaptive" in mits else None,
        threshold=float(cfg.threshold or 0.0), min_k=max(1, cfg.min_k), keep=keep, compensate="compensate" in mits,
    )


def _mean_out(stats: ExpertStats, layer) -> torch.Tensor:
    stats.require("weighted_out", "weight_sum", what="dropped-expert compensation")
    h = stats.get("weighted_out", layer.index).float()
    s = stats.get("weight_sum", layer.index).float()
    if h.shape != (layer.num_experts, layer.hidden_size):
        raise MoekitError(f"layer {layer.index}: statistics hold {h.shape[0]} experts, the model {layer.num_experts}; re-profile")
    return h / s.clamp_min(1e-12)[:, None]  # experts never routed to get mu = 0


def _sensitivity(layers, plans, inputs: BlockInputs) -> dict[int, list[float]]:
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


def _calibrate_adaptive(model, layers, plans, cfg: RouteConfig, inputs: BlockInputs | None, tokens) -> None:
    if cfg.threshold is not None:
        return
    adaptive = [plans[layer.index] for layer in layers]
    for round_ in range(max(1, cfg.calibration_rounds)):
        if round_ > 0:  # hidden states of the re-routed model, then calibrate again
            for layer in layers:
                install(layer, plans[layer.index])
            inputs = BlockInputs(model, layers).run(tokens)
            for layer in layers:
                uninstall(layer)
                layer.router.top_k = plans[layer.index].K
        routings = [full_routing(layer, inputs.get(layer.index), plans[layer.index].K) for layer in layers]
        t = calibrate_threshold(routings, adaptive, float(cfg.top_k))
        for p in adaptive:
            p.threshold = t


def _rescale(layer, plan: LayerPlan, x: torch.Tensor, mode: str) -> float:
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


def _scale_experts(layer, c: float) -> None:
    """Fold a constant into every routed expert's output: down projection (and its bias, GPT-OSS)."""
    ex = layer.experts
    ex.down_proj.data.mul_(c)
    if getattr(ex, "down_proj_bias", None) is not None:
        ex.down_proj_bias.data.mul_(c)


class ActiveCounter:
    """Context manager counting the routed experts actually run per token, per MoE layer (router hooks)."""

    def __init__(self, model):
        self.layers = arch.moe_layers(model)
        self.counts = {layer.index: [0, 0] for layer in self.layers}
        self.hooks = []

    def __enter__(self) -> ActiveCounter:
        for layer in self.layers:
            self.hooks.append(layer.router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _hook(self, layer):
        def hook(_module, _args, out):
            w, i = out[1], out[2]
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


def _report(model, layers, plans, big_k, before, measured, scales, errors, cfg, mits) -> dict:
    avg_k = measured["average"] if measured else sum(p.k for p in plans.values()) / len(plans)
    orig_k = sum(big_k.values()) / len(big_k)
    per_expert = layers[0].expert_param_count()
    n_layers = len(layers)
    active_after = before["active"] - round((orig_k - avg_k) * n_layers * per_expert)
    return {
        "top_k_original": orig_k,
        "budget": cfg.top_k if cfg.top_k is not None else sum(cfg.top_k_per_layer.values()) / len(cfg.top_k_per_layer),
        "mitigations": sorted(mits),
        "top_k_per_layer": {idx: p.k if not p.rule else None for idx, p in plans.items()},
        "threshold": plans[layers[0].index].threshold if "adaptive" in mits else None,
        "super_experts": {idx: p.keep for idx, p in plans.items() if p.keep},
        "scales": scales,
        "sensitivity": errors,
        "measured": measured,
        "average_active_experts": avg_k,
        "routed_expert_compute_saved": 1 - avg_k / orig_k,
        "active_params_before": before["active"],
        "active_params_after": active_after,
        "active_params_saved": 1 - active_after / before["active"],
        "form": checkpoint_form(model),
    }


def checkpoint_form(model) -> str:
    """'standard' when plain transformers loads the saved model as it runs here, else 'moekit'."""
    return "standard" if arch.is_uniform(model) and not is_routed(model) else "moekit"
