"""Expert merging: fewer experts per layer, each merged from a cluster of similar ones.

``merge_(model, MergeConfig(...), stats=stats, tokens=calib)`` groups each MoE layer's experts
(:mod:`moekit.grouping`: hierarchical clustering of h_e = weighted_out / weight_sum, MC-SMoE or REAM
grouping; super experts are never merged), merges every cluster into ONE expert, gives it ONE router
row, and rewrites the layer with ``MoELayer.replace_experts`` — the model is genuinely smaller.

Merge rules (:mod:`moekit.merge_rules`; every projection P of gate / up / down (up / down for ungated experts),
members i of a cluster):
``avg`` (HC-SMoE, P = sum_i a_i P_i, a_i = activation-frequency ratios, optional neuron alignment),
``svd`` (the Samsung AI Challenge 2025 pipeline, Sub-MoE: [P_1 .. P_n] = U S [V_1 .. V_n], P = U S sum_i a_i V_i — equal to ``avg``
unless ``rank`` truncates) and ``select`` (keep the members' most important neurons).

Every rule is linear in the coefficients a (one per member and projection). With ``learn=True`` they
are fitted layer by layer so that the merged block reproduces the original block's output on calibration
hidden states (captured by forward hooks): fp32, a few parameters per cluster, Adam with a rejected step
and a halved step size whenever the training loss would rise (so the training curve is monotone), early
stopping on held-back sequences, and the initialisation kept whenever the fit is not better there.

Router row of a merged expert: ``dominant`` (the most-used member's row), ``average`` (frequency-weighted
mean of the rows), ``fitted`` (least squares so that the row's logit reproduces the members' combined
logit log-sum-exp, i.e. the probability that the original router picks any member), or ``auto`` (the one
with the lowest block-output error on held-back tokens, per layer).

Defaults come from bench/merge_table.py on smollm2-moe (24 experts per layer; perplexity on 16,384 dev tokens):
REAM grouping + ``select`` gives 80.98 at 18 experts and 96.88 at 12, against 82.48 and 101.97 for REAP
pruning at the same size; HC grouping + ``select`` gives 83.65 / 106.10 and HC + ``avg`` 136.4 at 12 (carved
experts are disjoint neuron sets, so averaging mixes unrelated neurons). Learned coefficients lower the
held-back block error but raise perplexity (REAM at 12: 96.88 -> 104.77), so ``learn`` is off by default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.keys import KEPT_KEY  # prune's record of surviving source experts
from moekit.core.registry import register
from moekit.errors import MoekitError
from moekit.merge.grouping import centre_groups, check_feasible, hc_groups, hc_heights
from moekit.merge.fit import BlockFit, capture_inputs, fit_coefficients, split_holdout
from moekit.merge.rules import PROJ, Cluster, align_to, assemble, permute_expert, select_bases, svd_bases
from moekit.profile.stats import ExpertStats, super_experts

GROUPINGS = ("hc", "mcsmoe", "ream")
RULES = ("avg", "svd", "select")
ROUTERS = ("dominant", "average", "fitted", "auto")


@dataclass
class MergeConfig:
    grouping: str = "ream"  # ream | hc | mcsmoe (ream measured best, bench/merge_table.py)
    rule: str = "select"  # select | avg | svd (select measured best)
    align: bool = False  # permute neurons onto the dominant member before merging
    rank: int | None = None  # svd rule: singular values kept per projection (None: all)
    target: int | None = None  # experts per layer after merging
    target_total: int | None = None  # routed experts over all MoE layers after merging
    merges_per_layer: int | None = None  # experts removed per layer
    max_cluster: int | None = None  # largest cluster
    router: str = "auto"  # dominant | average | fitted | auto
    learn: bool = False  # fit merge coefficients on calibration tokens
    learn_router: bool = False  # also fit the merged experts' router rows
    steps: int = 40
    lr: float = 0.02
    patience: int = 6
    holdout: float = 0.25  # fraction of calibration sequences held back
    fit_tokens: int = 4096  # training tokens per layer (sampled from the not-held-back sequences)
    batch_size: int = 4  # calibration sequences per forward pass while capturing
    super_rule: str = "paper"  # super-expert rule (moekit.stats.super_experts), or "none"
    protect: list = field(default_factory=list)  # extra (layer, expert) pairs never merged
    seed: int = 0

    def validate(self) -> None:
        if self.grouping not in GROUPINGS:
            raise MoekitError(f"unknown grouping '{self.grouping}': use one of {', '.join(GROUPINGS)}")
        if self.rule not in RULES:
            raise MoekitError(f"unknown merge rule '{self.rule}': use one of {', '.join(RULES)}")
        if self.router not in ROUTERS:
            raise MoekitError(f"unknown router choice '{self.router}': use one of {', '.join(ROUTERS)}")
        given = [k for k in ("target", "target_total", "merges_per_layer") if getattr(self, k) is not None]
        if len(given) != 1:
            raise MoekitError("say how far to merge with exactly one of --target, --target-total, --merges-per-layer")
        if any(getattr(self, k) is not None and getattr(self, k) < 0 for k in given):
            raise MoekitError("merge targets must be non-negative")
        if self.max_cluster is not None and self.max_cluster < 1:
            raise MoekitError("--max-cluster must be at least 1")
        if self.rank is not None and self.rank < 1:
            raise MoekitError("--rank must be at least 1")
        if not 0 < self.holdout < 1:
            raise MoekitError("holdout must be a fraction between 0 and 1")


# ---------------------------------------------------------------------------------------------- grouping
def expert_features(stats: ExpertStats, layer: int) -> np.ndarray:
    """h_e = weighted_out / weight_sum: each expert's router-weighted mean output [E, H]."""
    wo = stats.get("weighted_out", layer).double()
    ws = stats.get("weight_sum", layer).double().clamp_min(1e-12)
    return (wo / ws[:, None]).numpy()


def expert_frequency(stats: ExpertStats, layer: int) -> np.ndarray:
    return stats.get("rank_counts", layer).double().sum(1).numpy()


def expert_saliency(stats: ExpertStats, layer: int) -> np.ndarray:
    """REAP saliency: mean of g_e * ||E_e(x)|| over the tokens routed to e."""
    counts = stats.get("rank_counts", layer).double().sum(1).clamp_min(1)
    return (stats.get("reap_sum", layer).double() / counts).numpy()


def protected_experts(stats: ExpertStats, cfg: MergeConfig) -> set[tuple[int, int]]:
    out = {(int(a), int(b)) for a, b in cfg.protect}
    if cfg.super_rule != "none":
        if not stats.has("down_max"):
            raise MoekitError("the statistics file lacks down_max, so super experts cannot be found: re-run "
                              "`moekit profile` or pass --super-rule none")
        out |= set(super_experts(stats, rule=cfg.super_rule))
    return out


def plan_groups(layers: list[arch.MoELayer], stats: ExpertStats, cfg: MergeConfig) -> dict[int, list[list[int]]]:
    """Clusters of original expert indices for every MoE layer (protected experts stay alone)."""
    protected = protected_experts(stats, cfg)
    free = {}  # layer -> (protected experts, mergeable experts)
    for layer in layers:
        keep = [e for e in range(layer.num_experts) if (layer.index, e) in protected]
        free[layer.index] = (keep, [e for e in range(layer.num_experts) if (layer.index, e) not in protected])
    clusters_per_layer = _cluster_counts(layers, stats, cfg, free)
    plan = {}
    for layer in layers:
        keep, mergeable = free[layer.index]
        n = clusters_per_layer[layer.index]
        feats = expert_features(stats, layer.index)[mergeable]
        where = f"layer {layer.index}: "
        check_feasible(len(mergeable), n, cfg.max_cluster, where)
        if cfg.grouping == "hc":
            local = hc_groups(feats, n, cfg.max_cluster)
        elif cfg.grouping == "mcsmoe":
            local = centre_groups(feats, expert_frequency(stats, layer.index)[mergeable], n, cfg.max_cluster, "nearest")
        else:
            local = centre_groups(feats, expert_saliency(stats, layer.index)[mergeable], n, cfg.max_cluster, "greedy")
        groups = [[mergeable[i] for i in g] for g in local] + [[e] for e in keep]
        plan[layer.index] = sorted(groups, key=lambda g: g[0])
    return plan


def _cluster_counts(layers, stats, cfg: MergeConfig, free) -> dict[int, int]:
    """How many clusters each layer's mergeable experts form."""
    out = {}
    for layer in layers:
        keep, mergeable = free[layer.index]
        if cfg.merges_per_layer is not None:
            n = len(mergeable) - cfg.merges_per_layer
        elif cfg.target is not None:
            if cfg.target >= layer.num_experts:
                raise MoekitError(f"--target {cfg.target} is not below layer {layer.index}'s {layer.num_experts} experts: "
                                  f"nothing to merge; choose a target below {layer.num_experts}")
            n = cfg.target - len(keep)
        else:
            n = len(mergeable)
        total = n + len(keep)
        if cfg.target_total is None and total < layer.top_k:
            raise MoekitError(f"layer {layer.index}: {total} experts would remain, fewer than top-k {layer.top_k}; merge less")
        out[layer.index] = n
    if cfg.target_total is not None:
        out = _spread_global(layers, stats, cfg, free)
    return out


def _spread_global(layers, stats, cfg: MergeConfig, free) -> dict[int, int]:
    """Spread a global expert target over layers: the globally cheapest merges by normalised linkage height
    (hc), or merges in proportion to each layer's mergeable experts (mcsmoe, ream)."""
    now = sum(layer.num_experts for layer in layers)
    todo = now - cfg.target_total
    floor = {}
    for layer in layers:
        keep, mergeable = free[layer.index]
        cap_min = math.ceil(len(mergeable) / cfg.max_cluster) if cfg.max_cluster else min(1, len(mergeable))
        floor[layer.index] = max(cap_min, layer.top_k - len(keep), min(1, len(mergeable)))
    room = {i: len(free[i][1]) - floor[i] for i in floor}
    if todo < 0 or todo > sum(room.values()):
        raise MoekitError(f"a global target of {cfg.target_total} experts is out of reach (now {now}, at least "
                          f"{now - sum(room.values())} with these limits)")
    merges = dict.fromkeys(floor, 0)
    if cfg.grouping == "hc":
        cands = []
        for layer in layers:
            feats = expert_features(stats, layer.index)[free[layer.index][1]]
            hs = hc_heights(feats, cfg.max_cluster, floor[layer.index])[: room[layer.index]]
            cands += [(h, layer.index, j) for j, h in enumerate(hs)]
        for _, i, _ in sorted(cands)[:todo]:
            merges[i] += 1
    else:
        share = {i: todo * room[i] / max(1, sum(room.values())) for i in room}
        for i in room:
            merges[i] = int(share[i])
        for i in sorted(room, key=lambda i: share[i] - merges[i], reverse=True)[: todo - sum(merges.values())]:
            merges[i] += 1
    return {i: len(free[i][1]) - merges[i] for i in floor}


# ---------------------------------------------------------------------------------------------- clusters
def neuron_importance(layer: arch.MoELayer, w: dict[str, torch.Tensor], freq: np.ndarray,
                      x: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per expert, per intermediate neuron: sum over routed calibration tokens of g * |h_j| times ||down_j||
    (with ``x``), else frequency times ||gate_j|| ||up_j|| ||down_j|| (no gate factor for ungated experts)."""
    def norm(t, dim):  # in float32 without a float32 copy of the whole tensor
        return torch.linalg.vector_norm(t, dim=dim, dtype=torch.float32)

    down_norm = norm(w["down"], 1)  # [E, I]
    if x is None:
        f = torch.as_tensor(freq, dtype=torch.float32)
        gate_norm = norm(w["gate"], 2) if "gate" in w else 1.0
        return list(f[:, None] * gate_norm * norm(w["up"], 2) * down_norm)
    _, weights, idx = layer.route(x)
    out = []
    with torch.no_grad():
        for e in range(layer.num_experts):
            tok, pos = torch.nonzero(idx == e, as_tuple=True)
            h = layer.expert_hidden(e, x[tok].to(layer.router_weight.dtype)).float().abs()
            out.append((weights[tok, pos].float()[:, None] * h).sum(0).cpu() * down_norm[e].cpu())
    return out


def build_clusters(layer: arch.MoELayer, groups: list[list[int]], freq: np.ndarray, cfg: MergeConfig,
                   x: torch.Tensor | None = None) -> list[Cluster]:
    """The clusters' bases and initial coefficients (``x``: calibration inputs, for the ``select`` rule).

    Bases are kept in the layer's dtype (the merge upcasts one cluster at a time): a single-member cluster's basis
    is a view of the layer's own weights, a multi-member one a copy of its members (float32 only for ``svd``)."""
    w = layer.expert_weights(copy=False)
    b = layer.expert_biases()
    importance = neuron_importance(layer, w, freq, x) if cfg.rule == "select" else None
    out = []
    for members in groups:
        experts = []
        for e in members:
            one = {p: w[p][e] for p in layer.projections}
            if b is not None:
                one.update({f"{p}_b": b[p][e].float() for p in PROJ})
            experts.append(one)
        f = torch.as_tensor(freq[members], dtype=torch.float32)
        ratios = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / len(members))
        if cfg.align and len(members) > 1 and cfg.rule != "select":
            dom = int(torch.argmax(ratios))
            experts = [x if i == dom else permute_expert(x, align_to(experts[dom], x)) for i, x in enumerate(experts)]
        if len(members) == 1:
            bases = {k: v.unsqueeze(0) for k, v in experts[0].items()}
        else:
            bases = {k: torch.stack([x[k] for x in experts]) for k in experts[0]}
        alpha0 = ratios.repeat(3, 1)
        if cfg.rule == "svd" and len(members) > 1:
            for p in layer.projections:
                bases[p] = svd_bases(bases[p].float(), cfg.rank)
        elif cfg.rule == "select" and len(members) > 1:
            bases = select_bases(experts, [importance[e] for e in members], ratios)
            alpha0 = torch.ones(3, len(members))
        out.append(Cluster(list(members), bases, alpha0))
    return out


# ---------------------------------------------------------------------------------------------- router rows
def router_rows(layer: arch.MoELayer, groups, freq: np.ndarray, how: str, x: torch.Tensor | None = None):
    """Router weight [E', H] and bias [E'] (or None) for the merged experts."""
    w = layer.router_weight.detach().float()
    b = None if layer.router_bias is None else layer.router_bias.detach().float()
    rows, biases = [], []
    for members in groups:
        f = torch.as_tensor(freq[members], dtype=torch.float32)
        if len(members) == 1 or how == "dominant":
            e = members[int(torch.argmax(f))]
            rows.append(w[e])
            biases.append(None if b is None else b[e])
            continue
        ratios = f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / len(members))
        avg = (ratios[:, None] * w[members]).sum(0)
        avg_b = None if b is None else (ratios * b[members]).sum()
        if how == "average":
            rows.append(avg)
            biases.append(avg_b)
        elif how == "fitted":
            if x is None:
                raise MoekitError("a fitted router row needs calibration tokens: pass --data")
            r, rb = _fit_row(layer, x, w[members], None if b is None else b[members], avg, avg_b)
            rows.append(r)
            biases.append(rb)
        else:
            raise MoekitError(f"unknown router choice '{how}'")
    weight = torch.stack(rows)
    bias = None if b is None else torch.stack(biases)
    return weight, bias


def _fit_row(layer: arch.MoELayer, x: torch.Tensor, w: torch.Tensor, b, avg: torch.Tensor, avg_b):
    """Least-squares row (ridge towards the average row) whose logit reproduces the members' combined logit:
    log-sum-exp for softmax routers (probability that any member is picked), max for sigmoid routers."""
    x = x.float()
    logits = x @ w.T + (0 if b is None else b)
    target = logits.max(-1).values if layer.family.scoring == "sigmoid" else torch.logsumexp(logits, -1)
    xa = torch.cat([x, torch.ones(len(x), 1, device=x.device)], 1) if b is not None else x
    start = avg if b is None else torch.cat([avg, avg_b.reshape(1)])
    gram = (xa.T @ xa).double()
    lam = 1e-3 * gram.diagonal().mean()
    rhs = (xa.T @ (target - xa @ start)).double()
    delta = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), rhs).float()
    row = start + delta
    return (row, None) if b is None else (row[:-1], row[-1])


# ---------------------------------------------------------------------------------------------- the verb
@register("merge", MergeConfig, needs=("stats",), uses=("tokens",))
def merge_(model, cfg: MergeConfig, *, stats: ExpertStats | None = None, tokens: torch.Tensor | None = None,
           teacher=None, inputs: dict[int, torch.Tensor] | None = None) -> dict:
    """Merge experts in place; return a report (groups, router choice, reconstruction errors, loss curves).

    ``tokens`` [n, L]: calibration text, needed for learned coefficients and fitted router rows.
    ``inputs``: the MoE blocks' inputs on ``tokens`` from :func:`moekit.merge.fit.capture_inputs` on this
    (unmerged) model, to reuse one capture when merging several copies of a model."""
    if stats is None:
        raise MoekitError("merging needs expert statistics: pass stats=moekit.profile.profile(model, tokens=...)")
    calib_tokens = tokens
    layers = arch.require_moe(model)
    check_inputs(model, layers, cfg, stats, tokens)
    plan = plan_groups(layers, stats, cfg)
    before = arch.param_counts(model)
    if calib_tokens is not None:
        inputs = dict(inputs) if inputs is not None else capture_inputs(model, layers, calib_tokens, cfg.batch_size)
    else:
        inputs = None
    split = split_holdout(len(calib_tokens), cfg.holdout, cfg.seed) if calib_tokens is not None else None
    report = {"config": asdict(cfg), "params_before": before, "layers": []}
    for layer in tqdm(layers, desc="merge layers"):
        report["layers"].append(_merge_layer(layer, plan[layer.index], stats, cfg, inputs, split))
    if hasattr(model.config, KEPT_KEY):  # merged experts are no longer a subset of the pruned source's
        delattr(model.config, KEPT_KEY)
    report["params_after"] = arch.param_counts(model)
    report["experts_after"] = {layer.index: layer.num_experts for layer in layers}
    return report


def check_inputs(model, layers, cfg: MergeConfig, stats: ExpertStats, tokens) -> None:
    """What merging needs, checked before any work (the in-memory and the layer-sequential paths)."""
    cfg.validate()
    stats.check_model(model)
    stats.require("weighted_out", "weight_sum", "rank_counts", what="merging")
    if cfg.grouping == "ream":
        stats.require("reap_sum", what="REAM grouping")
    missing = [layer.index for layer in layers if layer.index not in stats.layers]
    if missing:
        raise MoekitError(f"the statistics file has no layers {missing}: profile every MoE layer first")
    if tokens is None and (cfg.learn or cfg.router == "fitted"):
        raise MoekitError("learned coefficients and fitted router rows need calibration tokens: pass --data")


def _merge_layer(layer: arch.MoELayer, groups, stats: ExpertStats, cfg: MergeConfig, inputs, split) -> dict:
    freq = expert_frequency(stats, layer.index)
    rec = {"layer": layer.index, "experts_before": layer.num_experts, "experts_after": len(groups),
           "groups": groups}
    cb = _merged_correction_bias(layer, groups, freq)
    dtype = layer.router_weight.dtype
    x_tr = x_va = None
    if inputs is not None:
        x = inputs.pop(layer.index)
        x_tr = _subsample(x[split[0]].reshape(-1, x.shape[-1]), cfg.fit_tokens, cfg.seed)
        x_va = x[split[1]].reshape(-1, x.shape[-1])
        device = layer.router_weight.device
        x_tr, x_va = x_tr.to(device), x_va.to(device)
        layer.block.float()
        with torch.no_grad():
            y_tr, y_va = layer.block_forward(x_tr[None])[0], layer.block_forward(x_va[None])[0]
    clusters = build_clusters(layer, groups, freq, cfg, x_tr)
    options = [cfg.router] if cfg.router != "auto" else (["dominant", "average", "fitted"] if x_tr is not None
                                                         else ["average"])
    candidates = {how: router_rows(layer, groups, freq, how, x_tr) for how in options}
    w, b = assemble(clusters, dtype=layer.experts.down_proj.dtype)
    first = candidates[options[0]]
    if x_tr is None:  # nothing to fit: the bases (copies of the merged members) go before the layer is rebuilt
        del clusters
        layer.replace_experts(w.get("gate"), w["up"], w["down"], first[0], first[1], cb, b)
        rec["router"] = {"choice": options[0]}
        return rec
    layer.replace_experts(w.get("gate"), w["up"], w["down"], first[0], first[1], cb, b)
    layer.block.float()
    probe = BlockFit(layer, clusters, x_va, y_va)
    with torch.no_grad():
        errors = {how: float(probe.error(None, rw.to(x_va.device), None if rb is None else rb.to(x_va.device)))
                  for how, (rw, rb) in candidates.items()}
    choice = min(errors, key=errors.get)
    rec["router"] = {"choice": choice, "holdout_error": errors}
    rw, rb = candidates[choice]
    rec["error_init"] = errors[choice]
    if cfg.learn:
        layer.replace_experts(w.get("gate"), w["up"], w["down"], rw, rb, cb, b)  # the chosen router in place
        layer.block.float()
        fixed = not cfg.learn_router
        train = BlockFit(layer, clusters, x_tr, y_tr, fixed)
        val = BlockFit(layer, clusters, x_va, y_va, fixed)
        fit = fit_coefficients(train, val, rw, rb, cfg)
        rec.update(error_learned=fit["best"], curve={"train": fit["train"], "holdout": fit["holdout"]},
                   steps=fit["steps"], rejected_steps=fit["rejected_steps"])
        w, b = assemble(clusters, fit["alphas"], dtype=layer.experts.down_proj.dtype)
        rw = fit["router_weight"]
    layer.replace_experts(w.get("gate"), w["up"], w["down"], rw, rb, cb, b)
    layer.block.to(dtype)
    return rec


def _subsample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if len(x) <= n:
        return x
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[pick.to(x.device)]


def _merged_correction_bias(layer: arch.MoELayer, groups, freq):
    """DeepSeek-V3's selection bias for merged experts: the most-used member's."""
    cb = layer.correction_bias
    if cb is None:
        return None
    return torch.stack([cb.detach()[g[int(np.argmax(freq[g]))]] for g in groups])
