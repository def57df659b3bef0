"""Fewer activated experts per token, and training-free ways to win the accuracy back.

``route_(model, RouteConfig(top_k=k, mitigations=(...)), stats=stats, tokens=calib)`` lowers the number of
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

How it runs (:mod:`moekit.route.runtime`; the calibrations are in :mod:`moekit.route.calibrate`): the router
keeps its own maths. ``renorm``/``adaptive``/``super`` replace the router's ``forward`` on the instance by
:class:`~moekit.route.runtime.Rerouter`, which calls the class's forward at the original K and post-processes the
weights and indices; ``compensate`` wraps the experts' ``forward`` on the instance
(:class:`~moekit.route.runtime.Compensator`), with the means as a ``moekit_mean_out`` buffer. What a checkpoint needs:

==========================================  ===========================================================
form                                        loads with
==========================================  ===========================================================
global top-k, with or without ``rescale``   plain transformers (standard checkpoint)
per-layer top-k (``allocate``)              moekit (plain transformers would run the largest k everywhere)
``renorm`` / ``adaptive`` / ``super``       moekit: config key ``moekit_route``, re-applied on load
``compensate``                              moekit: ``moekit_mean_out`` buffers in ``moekit-model.st``
==========================================  ===========================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moekit.core import arch
from moekit.core.keys import MEAN_OUT, ROUTE_KEY
from moekit.core.registry import register
from moekit.errors import MoekitError
from moekit.profile.stats import ExpertStats, super_experts
from moekit.route.calibrate import (
    BlockInputs,
    allocate,
    calibrate_adaptive,
    measure_active,
    rescale_factor,
    sensitivity,
)
from moekit.route.runtime import LayerPlan, install, is_routed

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

    def validate(self) -> None:
        """The checks that need no model (:func:`route_` checks the budget against the model's layers)."""
        mits = set(self.mitigations)
        unknown = mits - set(MITIGATIONS)
        if unknown:
            raise MoekitError(f"unknown mitigation(s) {sorted(unknown)}: choose from {', '.join(MITIGATIONS)}")
        if self.top_k is None and not self.top_k_per_layer:
            raise MoekitError("no budget: give top_k (experts per token) or top_k_per_layer")
        if {"allocate", "adaptive"} <= mits:
            raise MoekitError("allocate and adaptive both set the per-layer budget: choose one of them")
        if self.top_k_per_layer and ({"allocate", "adaptive"} & mits):
            raise MoekitError("top_k_per_layer fixes each layer's k: "
                              "drop 'allocate' / 'adaptive' or drop top_k_per_layer")
        fixed_k = self.top_k is not None and not self.top_k_per_layer and not ({"allocate", "adaptive"} & mits)
        if fixed_k and self.top_k != int(self.top_k):
            raise MoekitError(f"top_k {self.top_k} is fractional: "
                              "only 'allocate' or 'adaptive' reach a fractional average")
        if self.rescale_mode not in ("norm", "lsq"):
            raise MoekitError(f"unknown rescale_mode '{self.rescale_mode}': use 'norm' or 'lsq'")
        if self.adaptive_rule not in ("cumprob", "beta"):
            raise MoekitError(f"unknown adaptive_rule '{self.adaptive_rule}': use 'cumprob' or 'beta'")
        if self.keep_weights and "renorm" in mits:
            raise MoekitError("keep_weights keeps the original top-K weights and 'renorm' rescales them: choose one")


# ---------------------------------------------------------------------------------------------- the verb
@register("route", RouteConfig, needs=("stats",), uses=("tokens",))
@torch.no_grad()
def route_(model, cfg: RouteConfig, *, stats: ExpertStats | None = None, tokens: torch.Tensor | None = None,
           teacher=None) -> dict:
    """Re-route ``model`` in place; return a report (per-layer k, mitigations, measured average k, compute saved).

    ``stats`` (the profile) drives ``compensate`` and ``super``; ``tokens`` [n, L] (calibration text) is needed by
    ``rescale``, ``allocate`` and a calibrated ``adaptive`` threshold, and measures the average k. ``teacher``
    is unused (the one verb shape)."""
    if stats is None:
        raise MoekitError("route needs the profile's statistics: pass stats (`moekit profile` writes them)")
    cfg.validate()
    layers = arch.require_moe(model)
    mits = _check(cfg, layers, tokens)
    if is_routed(model):
        raise MoekitError("this model is already re-routed (config has moekit_route); load the original model first")
    if {"compensate", "super"} & mits:
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
        errors = sensitivity(layers, plans, inputs)
        total = int(round(cfg.top_k * len(layers)))
        ks = allocate(errors, big_k, total, max(1, cfg.min_k))
        for idx, k in ks.items():
            plans[idx].k = k

    if "adaptive" in mits and cfg.threshold is None:
        calibrate_adaptive(model, layers, plans, float(cfg.top_k), cfg.calibration_rounds, inputs, tokens)

    scales = {}
    if "rescale" in mits:
        scales = {layer.index: rescale_factor(layer, plans[layer.index], inputs.get(layer.index), cfg.rescale_mode)
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


def _check(cfg: RouteConfig, layers, tokens) -> set[str]:
    """The checks against the model's MoE layers and the inputs given; returns the mitigations."""
    mits = set(cfg.mitigations)
    max_k = min(layer.top_k for layer in layers)
    low = cfg.min_k if "adaptive" in mits else 1
    fewest = max(layer.min_top_k for layer in layers)  # LongCat-Flash's experts need 2 in transformers 5.24 (arch.MoELayer.min_top_k)
    if cfg.top_k is not None and not cfg.top_k_per_layer and not max(low, fewest) <= cfg.top_k <= max_k:
        raise MoekitError(f"top_k {cfg.top_k} must be between {fewest} and the model's top-k {max_k}")
    if cfg.top_k_per_layer:
        known = {layer.index: layer.top_k for layer in layers}
        for idx, k in cfg.top_k_per_layer.items():
            if int(idx) not in known:
                raise MoekitError(f"layer {idx} is not an MoE layer: MoE layers are {sorted(known)}")
            if not fewest <= int(k) <= known[int(idx)]:
                raise MoekitError(f"layer {idx}: top_k {k} must be between {fewest} and its top-k {known[int(idx)]}")
    needs_tokens = bool({"rescale", "allocate"} & mits) or ("adaptive" in mits and cfg.threshold is None)
    if needs_tokens and tokens is None:
        raise MoekitError("rescale, allocate and a calibrated adaptive threshold need calibration text: pass --data")
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


def _scale_experts(layer, c: float) -> None:
    """Fold a constant into every routed expert's output: down projection (and its bias, GPT-OSS)."""
    ex = layer.experts
    ex.down_proj.data.mul_(c)
    if getattr(ex, "down_proj_bias", None) is not None:
        ex.down_proj_bias.data.mul_(c)


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
