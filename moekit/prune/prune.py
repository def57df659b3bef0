"""Expert pruning: remove whole routed experts, chosen from the statistics file (no new calibration pass), or
from the weights alone (``aimer``, ``random``: no statistics file needed).

    report = prune_(model, PruneConfig(criterion="reap", ratio=0.25), stats=stats)
    report = prune_(model, PruneConfig(criterion="aimer", ratio=0.25))  # calibration-free

Criteria (one score per expert, higher = keep; all sums in the statistics file, see ``moekit.stats``):

======================  ==============================================================================
``topk_prime``          the Samsung AI Challenge 2025 pipeline's rule: times selected within the top-k' (sum rank_counts[:, :k'];
                        k' = ``top_k_prime``, default the model's top-k)
``frequency``           times selected at any rank (sum rank_counts)
``prob_mass``           router probability mass over all tokens
``weighted_frequency``  router-weighted frequency: sum of the routing weights the expert received
``reap``                REAP (arXiv 2510.13999): mean over routed tokens of g_e * ||E_e(x)|| (reap_sum / count)
``ean``                 expert activation norm, per routed token: mean of ||E_e(x)|| (norm_sum / count)
``man``                 Mean Activation Norm (arXiv 2606.15716: routed-token-averaged, gate-free): the same
                        score as ``ean``, under the paper's name
``msan``                Mean Squared Activation Norm (arXiv 2606.15716): mean of ||E_e(x)||^2 over routed
                        tokens (sq_norm_sum / count)
``aimer``               AIMER (arXiv 2603.18492), calibration-free, from the weights alone: mean |w| / RMS(w)
                        over all of the expert's projection weights; the paper prunes the *highest* values,
                        so the score is its reciprocal RMS(w) / mean |w| (scale-free, >= 1)
``random``              seeded random scores: the control every table carries
======================  ==============================================================================

Experts never selected score 0 under the per-token means (reap, ean, man, msan). ``aimer`` and ``random`` need no
statistics file (``stats=None``); without one no super expert can be found, so none is protected.

Budgets (how many experts stay):

* ``keep=N`` or ``ratio=R`` (R = fraction of routed experts *removed*), with ``budget="uniform"``: the
  same count in every layer (a standard checkpoint); ``budget="global"``: one ranking over all layers,
  scores divided by their layer's mean (1.0 = the layer's average expert) so that layers whose scores
  live on different scales compete fairly. ``global_norm="median"`` is the option robust to one outsized
  score (a super expert shrinks every other score of its layer under the mean), but with an even expert
  count it puts exactly half of every layer above 1.0, so a 50% global budget equals the uniform one.
  Every layer keeps at least top-k experts. Per-layer counts then differ (moekit's non-uniform form,
  made standard again by :func:`make_uniform`).
* ``top_k_prime=K'`` alone (threshold mode, the Samsung AI Challenge 2025 pipeline's rule): keep every expert selected within
  the top-K' at least ``tau`` times; per-layer counts follow from the data.

Super experts (``moekit.stats.super_experts``) are always kept unless ``allow_super_experts``. The router
loses exactly the pruned rows (and biases); routing weights then follow the architecture's own
normalisation (renormalised top-k, or not, as the model does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.core import arch
from moekit.core.keys import KEPT_KEY  # per MoE layer, the source experts that survive (and the source's fingerprint)
from moekit.core.registry import register
from moekit.errors import MoekitError
from moekit.profile.stats import ExpertStats, super_experts

CRITERIA = ("topk_prime", "frequency", "prob_mass", "weighted_frequency", "reap", "ean", "man", "msan", "aimer",
            "random")
PER_TOKEN_MEAN = {"reap": "reap_sum", "ean": "norm_sum", "man": "norm_sum", "msan": "sq_norm_sum"}  # sum / count
NEEDS = {
    "topk_prime": ("rank_counts",),
    "frequency": ("rank_counts",),
    "prob_mass": ("prob_mass",),
    "weighted_frequency": ("weight_sum",),
    **{c: (num, "rank_counts") for c, num in PER_TOKEN_MEAN.items()},
    "aimer": (),
    "random": (),
}
CALIBRATION_FREE = tuple(c for c in CRITERIA if not NEEDS[c])  # run without a statistics file
BUDGETS = ("uniform", "global")
DEFAULT_CRITERION = "reap"
# criteria whose error-propagating scores measured better than their one-pass scores on smollm2-moe at -25% (perplexity,
# bench/README.md "Winning back what compression costs": REAP -0.7% (-0.8% at -50%), frequency -0.8%, weighted
# frequency -0.7%, EAN -0.6%; worse or equal: the top-6' count +0.3%, MSAN +0.9%, probability mass +0.0%): given
# calibration tokens these propagate unless told not to; the others stay one pass unless told to
PROPAGATE_BY_DEFAULT = ("reap", "frequency", "weighted_frequency", "ean", "man")


@dataclass
class PruneConfig:
    criterion: str | None = None  # None: DEFAULT_CRITERION, or "topk_prime" in threshold mode
    keep: int | None = None  # experts kept per layer (uniform) or on average (global)
    ratio: float | None = None  # fraction of routed experts removed
    top_k_prime: int | None = None  # k' of the top-k' rule; alone (no keep/ratio) it selects threshold mode
    tau: float = 1.0  # threshold mode: minimum top-k' selections to survive
    budget: str = "uniform"
    allow_super_experts: bool = False
    super_rule: str = "paper"
    seed: int = 0
    global_norm: str = "mean"  # global budget: scores divided by the layer's "mean" or "median"
    # error propagation: score layer i on what the already pruned layers 0..i-1 compute (calibration tokens needed).
    # None: where it measured better (PROPAGATE_BY_DEFAULT) when calibration tokens are given and the plan allows it
    # (uniform keep/ratio); False: the one-pass fast path (the statistics alone: one profile serves every ratio)
    propagate: bool | None = None

    def cannot_propagate(self) -> str | None:
        """Why this plan cannot be error-propagating, or None when it can."""
        return ("a global budget needs every layer's scores before the first is cut" if self.budget == "global" else
                "the threshold rule has no per-layer count to keep" if self.mode == "threshold" else
                f"criterion '{self.criterion}' reads no calibration text" if self.criterion in CALIBRATION_FREE else
                None)

    def propagates(self, has_tokens: bool) -> bool:
        """Whether pruning is error-propagating, given whether calibration tokens are at hand (see ``propagate``)."""
        why_not = self.cannot_propagate()
        if self.propagate is None:
            return has_tokens and why_not is None and self.criterion in PROPAGATE_BY_DEFAULT
        if self.propagate and why_not:
            raise MoekitError(f"error-propagating pruning is not possible here: {why_not}; drop propagate (--propagate)")
        if self.propagate and not has_tokens:
            raise MoekitError("error-propagating pruning scores each layer on calibration text: give tokens (--data), or "
                              "propagate=False (--no-propagate) for the one-pass path")
        return self.propagate

    @property
    def mode(self) -> str:
        if self.keep is not None:
            return "keep"
        if self.ratio is not None:
            return "ratio"
        return "threshold"

    def validate(self) -> None:
        if self.criterion is None:
            self.criterion = "topk_prime" if self.mode == "threshold" else DEFAULT_CRITERION
        if self.criterion not in CRITERIA:
            raise MoekitError(f"unknown criterion '{self.criterion}': use one of {', '.join(CRITERIA)}")
        if self.global_norm not in ("median", "mean"):
            raise MoekitError(f"unknown global normalisation '{self.global_norm}': use 'median' or 'mean'")
        if self.budget not in BUDGETS:
            raise MoekitError(f"unknown budget '{self.budget}': use 'uniform' or 'global'")
        if self.keep is not None and self.ratio is not None:
            raise MoekitError("give either keep (experts per layer) or ratio (fraction removed), not both")
        if self.keep is None and self.ratio is None and self.top_k_prime is None:
            raise MoekitError("say how much to prune: --keep N, --ratio R, or --top-k-prime K' [--tau T]")
        if self.keep is not None and self.keep < 1:
            raise MoekitError(f"keep={self.keep}: keep at least one expert per layer (and at least top-k)")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise MoekitError(f"ratio={self.ratio} is the fraction of experts removed: give a value in [0, 1)")
        if self.top_k_prime is not None and self.top_k_prime < 1:
            raise MoekitError(f"top-k'={self.top_k_prime} must be at least 1")
        if self.mode == "threshold":
            if self.criterion != "topk_prime":
                raise MoekitError(
                    f"the threshold rule counts top-k' selections; use criterion 'topk_prime' (not '{self.criterion}') "
                    "or --keep/--ratio"
                )
            if self.budget == "global":
                raise MoekitError("the threshold rule already decides each layer's count; drop --budget global")
            if self.tau <= 0:
                raise MoekitError(
                    f"tau={self.tau} keeps every expert; give a positive count (1 = selected at least once)"
                )


# ---------------------------------------------------------------------------------------------- scores
def expert_scores(stats: ExpertStats | None, layer: arch.MoELayer, cfg: PruneConfig) -> torch.Tensor:
    """Per-expert score [E] (float64) for ``cfg.criterion``; higher means more worth keeping."""
    e, c = layer.num_experts, cfg.criterion
    if c == "random":
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + layer.index)
        return torch.rand(e, generator=g, dtype=torch.float64)
    if c == "aimer":
        return 1.0 / aimer(layer)
    if c in ("topk_prime", "frequency") or c in PER_TOKEN_MEAN:
        rc = stats.get("rank_counts", layer.index).double()
        count = rc.sum(1)
    if c == "topk_prime":
        k = cfg.top_k_prime or layer.top_k
        if k > rc.shape[1]:
            raise MoekitError(
                f"top-k'={k} exceeds the top-k ({rc.shape[1]}) the statistics were counted at; use k' <= {rc.shape[1]}"
            )
        s = rc[:, :k].sum(1)
    elif c == "frequency":
        s = count
    elif c == "prob_mass":
        s = stats.get("prob_mass", layer.index).double()
    elif c == "weighted_frequency":
        s = stats.get("weight_sum", layer.index).double()
    else:
        num = stats.get(PER_TOKEN_MEAN[c], layer.index).double()
        s = torch.where(count > 0, num / count.clamp_min(1), torch.zeros_like(num))
    if s.shape != (e,):
        raise MoekitError(
            f"statistics for layer {layer.index} cover {s.shape[0]} experts, the model has {e}; profile this model"
        )
    if not torch.isfinite(s).all():
        bad = torch.nonzero(~torch.isfinite(s)).flatten().tolist()
        raise MoekitError(f"the statistics give layer {layer.index} non-finite '{c}' scores (experts {bad[:5]}): the "
                          "statistics file is damaged or was made on a diverged model; profile the model again")
    return s


def aimer(layer: arch.MoELayer) -> torch.Tensor:
    """AIMER of every routed expert [E] (float64; arXiv 2603.18492): mean |w| / RMS(w) over all the weights of
    the expert's gate (where it has one), up and down projections (biases left out). In (0, 1]: 1 when every weight
    has the same magnitude, lower the more the weights concentrate in a few large ones; unchanged by scaling the
    expert. An all-zero expert gets +inf (pruned first)."""
    ex = layer.experts
    if ex.down_proj.is_meta:
        raise MoekitError(f"criterion 'aimer' reads the expert weights, and layer {layer.index}'s are not in memory "
                          "(shard-wise, layer-sequential or offloaded); prune in memory: --mode memory, no --shardwise")
    out = torch.empty(layer.num_experts, dtype=torch.float64)
    for e in range(layer.num_experts):
        parts = [getattr(ex, n)[e].detach().double() for n in arch.EXPERT_WEIGHTS if hasattr(ex, n)]
        n = sum(p.numel() for p in parts)
        mean_abs = sum(p.abs().sum() for p in parts) / n
        rms = (sum(p.square().sum() for p in parts) / n).sqrt()
        out[e] = mean_abs / rms if rms > 0 else float("inf")
    return out


def layer_normalised(s: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Scores relative to the layer's typical expert (what the global budget ranks): divided by the layer's
    mean (default) or median (robust to one outsized score)."""
    ref = s.median() if how == "median" else s.mean()
    return s / ref if ref > 0 else torch.zeros_like(s)


# ---------------------------------------------------------------------------------------------- plans
def protected_experts(stats: ExpertStats | None, cfg: PruneConfig) -> dict[int, set[int]]:
    if cfg.allow_super_experts or stats is None:  # no statistics (a calibration-free criterion): none can be found
        return {}
    if not stats.has("down_max"):
        raise MoekitError(
            "cannot tell super experts apart: the statistics file lacks down_max; "
            "re-profile, or pass --allow-super-experts"
        )
    rule = cfg.super_rule if (cfg.super_rule != "paper" or stats.has("hidden_max")) else "first75"
    out: dict[int, set[int]] = {}
    for layer, e in super_experts(stats, rule=rule):
        out.setdefault(layer, set()).add(e)
    return out


def _order(scores: torch.Tensor, protect: set[int]) -> list[int]:
    """Experts best-first: protected first, then by score (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda e: (e not in protect, -float(scores[e]), e))


def _min_keep(layer: arch.MoELayer) -> int:
    return layer.top_k


def _check_count(layer: arch.MoELayer, n: int, protect: set[int], why: str) -> None:
    if n < 1:
        raise MoekitError(f"layer {layer.index}: {why} keeps zero experts; keep at least top-k ({layer.top_k})")
    if n < layer.top_k:
        raise MoekitError(
            f"layer {layer.index}: {why} keeps {n} experts, fewer than top-k={layer.top_k}; keep more experts"
        )
    if n % layer.n_group:
        raise MoekitError(
            f"layer {layer.index}: {why} keeps {n} experts, not a multiple of n_group={layer.n_group}; "
            f"keep a multiple of {layer.n_group}"
        )
    if layer.n_group > 1 and layer.top_k > layer.topk_group * (n // layer.n_group):
        raise MoekitError(
            f"layer {layer.index}: {n} experts in {layer.n_group} groups cannot supply top-k={layer.top_k} "
            f"from topk_group={layer.topk_group} groups; keep more experts"
        )
    if len(protect) > n:
        raise MoekitError(
            f"layer {layer.index}: {len(protect)} super experts but only {n} kept; keep more experts "
            "or pass --allow-super-experts"
        )


def _uniform_keep(layer: arch.MoELayer, scores: torch.Tensor, protect: set[int], n: int) -> list[int]:
    _check_count(layer, n, protect, f"keep={n}")
    g = layer.n_group
    if g == 1:
        return sorted(_order(scores, protect)[:n])
    # group-limited routing (DeepSeek-V3): groups are contiguous blocks; prune evenly so no expert changes group
    size, per = layer.num_experts // g, n // g
    keep = []
    for j in range(g):
        members = range(j * size, (j + 1) * size)
        local = {e - j * size for e in protect if e in members}
        if len(local) > per:
            raise MoekitError(
                f"layer {layer.index}: group {j} holds {len(local)} super experts but keeps {per}; keep more "
                "experts or pass --allow-super-experts"
            )
        keep += [j * size + e for e in _order(scores[j * size : (j + 1) * size], local)[:per]]
    return sorted(keep)


def require_stats(cfg: PruneConfig, given: bool) -> None:
    """Only the calibration-free criteria run without a statistics file."""
    if not given and NEEDS[cfg.criterion]:
        raise MoekitError(
            f"criterion '{cfg.criterion}' needs expert statistics: pass --stats FILE from `moekit profile` (in Python "
            f"stats=moekit.profile.profile(model, tokens=...)), or use a calibration-free criterion "
            f"({', '.join(CALIBRATION_FREE)})"
        )


def plan(layers: list[arch.MoELayer], stats: ExpertStats | None, cfg: PruneConfig) -> dict[int, list[int]]:
    """Experts kept per MoE layer (decoder-layer index -> sorted expert indices); ``stats`` may be None for a
    calibration-free criterion."""
    cfg.validate()
    require_stats(cfg, stats is not None)
    if stats is not None:
        stats.require(*NEEDS[cfg.criterion], what=f"criterion '{cfg.criterion}'")
        missing = [layer.index for layer in layers if layer.index not in stats.layers]
        if missing:
            raise MoekitError(f"the statistics file has no data for MoE layers {missing}; profile the whole model")
    protect = protected_experts(stats, cfg)
    scores = {layer.index: expert_scores(stats, layer, cfg) for layer in layers}
    if cfg.mode == "threshold":
        out = {}
        for layer in layers:
            p = protect.get(layer.index, set())
            keep = sorted({e for e in range(layer.num_experts) if scores[layer.index][e] >= cfg.tau} | p)
            _check_count(layer, len(keep), p, f"the top-{cfg.top_k_prime} >= {cfg.tau} rule")
            out[layer.index] = keep
        return out
    if cfg.budget == "uniform":
        out = {}
        for layer in layers:
            n = cfg.keep if cfg.mode == "keep" else layer.num_experts - round(cfg.ratio * layer.num_experts)
            if n > layer.num_experts:
                raise MoekitError(
                    f"layer {layer.index}: keep={n} exceeds its {layer.num_experts} experts; give a smaller --keep"
                )
            out[layer.index] = _uniform_keep(layer, scores[layer.index], protect.get(layer.index, set()), n)
        return out
    return _global_plan(layers, scores, protect, cfg)


def _global_plan(layers, scores, protect, cfg: PruneConfig) -> dict[int, list[int]]:
    if any(layer.n_group > 1 for layer in layers):
        raise MoekitError("a global budget would break group-limited routing (n_group > 1); use --budget uniform")
    total = sum(layer.num_experts for layer in layers)
    target = cfg.keep * len(layers) if cfg.mode == "keep" else total - round(cfg.ratio * total)
    if target > total:
        raise MoekitError(
            f"keep={cfg.keep} per layer on average exceeds the experts the model has; give a smaller --keep"
        )
    keep: dict[int, set[int]] = {}
    rest = []
    for layer in layers:
        p = protect.get(layer.index, set())
        order = _order(scores[layer.index], p)
        forced = set(order[: _min_keep(layer)]) | p  # every layer keeps at least top-k, and its super experts
        keep[layer.index] = forced
        z = layer_normalised(scores[layer.index], cfg.global_norm)
        rest += [(-float(z[e]), layer.index, e) for e in range(layer.num_experts) if e not in forced]
    n_forced = sum(len(v) for v in keep.values())
    if target < n_forced:
        raise MoekitError(
            f"the global budget keeps {target} experts but top-k per layer and super experts need {n_forced}; "
            "prune less"
        )
    for _, li, e in sorted(rest)[: target - n_forced]:
        keep[li].add(e)
    for layer in layers:
        _check_count(layer, len(keep[layer.index]), protect.get(layer.index, set()), "the global budget")
    return {li: sorted(v) for li, v in keep.items()}


# ---------------------------------------------------------------------------------------------- verbs
@register("prune", PruneConfig, needs=("stats",), uses=("tokens",))
def prune_(model, cfg: PruneConfig, *, stats: ExpertStats | None = None, tokens=None, teacher=None) -> dict:
    """Remove the experts ``cfg`` selects from ``model`` in place; return the report (see :func:`build_report`).

    ``stats`` come from :func:`moekit.profile.profile` on this model (or its unpruned source); None only for a
    calibration-free criterion (:data:`CALIBRATION_FREE`; then no super expert is protected). With calibration
    ``tokens`` [n_seq, seq_len], a uniform keep/ratio plan and a criterion of :data:`PROPAGATE_BY_DEFAULT` (or
    ``cfg.propagate=True``), the scores are error-propagating (:func:`prune_propagating_`; ``stats`` then only name
    the super experts); otherwise, and with ``cfg.propagate=False``, every layer is scored from ``stats`` (one pass).
    """
    cfg.validate()
    require_stats(cfg, stats is not None)
    if cfg.propagates(tokens is not None):
        return prune_propagating_(model, cfg, stats=stats, tokens=tokens)
    from moekit.profile.stats import fingerprint
    from moekit.prune.report import build_report, snapshot

    layers = arch.require_moe(model)
    stats = stats_for_model(model, stats) if stats is not None else None
    keep = plan(layers, stats, cfg)
    before = snapshot(model)
    apply_plan(model, keep, source_fingerprint=fingerprint(model))
    return build_report(before, snapshot(model), keep, cfg)


# ---------------------------------------------------------------------------------------------- error propagation
# Layer i's experts scored on the hidden states the already pruned layers 0..i-1 compute (the compressed model's own
# activations, as llm-compressor's REAP does by default), not on the original model's: one walk over the layers,
# layer i's calibration forward under the profile's hooks (the statistics a profile gathers), the layer pruned, and
# the calibration states run through the pruned layer on to layer i+1 -- one extra layer forward per layer, no second
# pass over the model. The original model's statistics then only say which experts are super experts (kept). It is
# the default, given calibration tokens, for the criteria where it measured better than the one-pass scores
# (PROPAGATE_BY_DEFAULT, PruneConfig.propagate). The walk runs on a model in memory (prune_propagating_, what prune_
# calls with tokens) and on a checkpoint layer by layer (moekit.prune.sequential.prune_propagating).
@torch.no_grad()
def propagating_plan(walk, cfg: PruneConfig, protect: dict[int, set[int]], tokens: torch.Tensor,
                     profile_cfg=None) -> dict[int, list[int]]:
    """Walk the layers of ``walk`` (an engine yielding :class:`~moekit.sequential.engine.Layer`), pruning each MoE
    layer in place to the experts its error-propagated scores keep; returns the kept experts per MoE layer (indices
    into the layer as it was)."""
    from moekit.profile.profile import ProfileConfig
    from moekit.profile.stream import LayerProfiler

    if cfg.cannot_propagate():
        raise MoekitError(f"error-propagating pruning is not possible here: {cfg.cannot_propagate()}")
    profiler = LayerProfiler(walk, profile_cfg or ProfileConfig(progress=False), tokens)
    keep: dict[int, list[int]] = {}
    for layer in walk:
        if layer.moe is not None:
            moe = layer.moe
            acc = profiler.observe(layer, update=False)
            live = ExpertStats(meta={"layers": [layer.index], "collected": list(acc.results())},
                               tensors={f"{k}.{layer.index}": v for k, v in acc.results().items()})
            n = cfg.keep if cfg.mode == "keep" else moe.num_experts - round(cfg.ratio * moe.num_experts)
            if n > moe.num_experts:
                raise MoekitError(f"layer {layer.index}: keep={n} exceeds its {moe.num_experts} experts; give a smaller "
                                  "--keep")
            keep[layer.index] = _uniform_keep(moe, expert_scores(live, moe, cfg), protect.get(layer.index, set()), n)
            if len(keep[layer.index]) != moe.num_experts:
                moe.keep_experts(keep[layer.index])
        layer.forward()  # the next layer sees what this (pruned) layer computes
    return keep


def prune_propagating_(model, cfg: PruneConfig, *, stats: ExpertStats | None, tokens: torch.Tensor, profile_cfg=None,
                       progress: bool = True) -> dict:
    """Error-propagating pruning of ``model`` in memory (on one device), in place; the report of ``prune_``.
    ``stats`` (the original model's profile) only name the super experts; None protects none."""
    from moekit.profile.stats import fingerprint
    from moekit.prune.report import build_report, snapshot
    from moekit.sequential.memory import InMemoryLayers

    cfg.validate()
    layers = arch.require_moe(model)
    stats = stats_for_model(model, stats) if stats is not None else None
    protect = protected_experts(stats, cfg)
    counts = {layer.index: layer.num_experts for layer in layers}
    before, source = snapshot(model), fingerprint(model)
    batch_size = profile_cfg.batch_size if profile_cfg is not None else 4
    walk = InMemoryLayers(model, tokens, batch_size=batch_size, progress=progress, desc="prune (error-propagating)")
    keep = propagating_plan(walk, cfg, protect, tokens, profile_cfg)
    if any(len(keep[i]) != n for i, n in counts.items()):
        record_plan(model, keep, counts, source)
    report = build_report(before, snapshot(model), keep, cfg)
    report["propagate"] = True
    return report


def apply_plan(model, keep: dict[int, list[int]], source_fingerprint: str) -> None:
    """Keep ``keep[layer]`` in each MoE layer and record the surviving source indices in the config."""
    counts = {layer.index: layer.num_experts for layer in arch.moe_layers(model)}
    changed = False
    for layer in arch.moe_layers(model):
        kept = keep.get(layer.index, list(range(layer.num_experts)))
        if len(kept) != layer.num_experts:
            if layer.experts.down_proj.is_meta:
                _keep_meta_experts(layer, kept)
            else:
                layer.keep_experts(kept)
            changed = True
    if changed:
        record_plan(model, keep, counts, source_fingerprint)


def record_plan(model, keep: dict[int, list[int]], counts: dict[int, int], source_fingerprint: str) -> None:
    """Record in the config which source experts survive in each MoE layer (``counts``: its experts before the plan
    ``keep`` was applied), composed with an earlier pruning's record; the config's expert counts follow the model."""
    old = getattr(model.config, KEPT_KEY, None)
    record = {"source": old["source"] if old else source_fingerprint, "layers": {}}
    for i, n in counts.items():
        kept = keep.get(i, list(range(n)))
        prev = old["layers"][str(i)] if old else list(range(n))
        record["layers"][str(i)] = [int(prev[e]) for e in kept]
    arch.sync_config(model)
    setattr(model.config, KEPT_KEY, record)


def _keep_meta_experts(layer: arch.MoELayer, kept: list[int]) -> None:
    """keep_experts for a model whose experts are on the meta device (shard-wise pruning): shapes only,
    router rows kept for real. The guards already ran in :func:`plan`."""
    from moekit.checkpoint.read import resize_empty

    idx = torch.tensor(kept, dtype=torch.long)
    e, z = layer.num_experts, layer.num_zero_experts  # zero experts' rows (LongCat-Flash) stay, after the kept ones
    idx = torch.cat([idx, torch.arange(e, e + z)])
    r = layer.router_linear
    owners = [(r, "weight"), (r, "bias")] + ([layer.selection_bias_owner] if layer.selection_bias_owner else [])
    # the router weight [E, H] holds the experts on dim 0, the biases on their last ([E]; ERNIE-4.5's [1, E])
    rows = {
        (m, n): getattr(m, n).detach().index_select(0 if (m, n) == (r, "weight") else -1, idx)
        for m, n in owners
        if getattr(m, n, None) is not None and not getattr(m, n).is_meta
    }
    resize_empty(layer, len(kept))
    for (m, n), t in rows.items():
        setattr(m, n, torch.nn.Parameter(t, requires_grad=False) if isinstance(getattr(m, n), torch.nn.Parameter) else t)


def stats_for_model(model, stats: ExpertStats) -> ExpertStats:
    """``stats`` if made for ``model``; statistics of its source model re-indexed to the surviving experts if
    ``model`` was pruned from it (so a pruned model can be pruned again or made uniform); else an error."""
    from moekit.profile.stats import fingerprint

    record = getattr(model.config, KEPT_KEY, None)
    if not record or stats.meta.get("fingerprint") != record.get("source"):
        stats.check_model(model)
        return stats
    out = ExpertStats(meta=dict(stats.meta, fingerprint=fingerprint(model)), tensors={})
    for key, t in stats.tensors.items():
        name, _, layer = key.rpartition(".")
        idx = record["layers"].get(layer) if name else None
        if idx is None:
            out.tensors[key] = t
            continue
        idx = torch.tensor(idx, dtype=torch.long)
        if t.dim() >= 1 and t.shape[0] >= len(idx):
            t = t[idx]
            if name == "gram":
                t = t[:, idx]
        out.tensors[key] = t
    return out


def make_uniform(
    model,
    stats: ExpertStats,
    *,
    keep: int | None = None,
    criterion: str = DEFAULT_CRITERION,
    allow_super_experts: bool = False,
    seed: int = 0,
) -> dict:
    """Make every MoE layer hold the same number of experts (default: the smallest layer's count),
    dropping the weakest by ``criterion``; the result is a standard checkpoint."""
    layers = arch.require_moe(model)
    n = keep if keep is not None else min(layer.num_experts for layer in layers)
    if n > min(layer.num_experts for layer in layers):
        raise MoekitError(
            f"keep={n} exceeds the smallest layer's {min(x.num_experts for x in layers)} experts; "
            "pruning cannot add experts back"
        )
    cfg = PruneConfig(criterion=criterion, keep=n, budget="uniform", allow_super_experts=allow_super_experts, seed=seed)
    report = prune_(model, cfg, stats=stats)
    if not arch.is_uniform(model):
        raise MoekitError("the model is still non-uniform (per-layer top-k differs); set one top-k first")
    return report
