"""Expert scores for densification, read from the statistics file (no new calibration pass).

Kim et al., "Pruning and Distilling Mixture-of-Experts into Dense Language Models" (2026):

* ``sf``      selection frequency: how many calibration tokens selected the expert;
* ``cp``      mean router probability over the tokens that selected it (0 if never selected);
* ``acp``     CP * sqrt(E||f_e(x)||^2), the RMS output norm over those tokens;
* ``do-acp``  diversity-aware ACP: with importance I = ACP and G the Gram matrix of expert outputs,
              K_ij = sqrt(I_i I_j) G_ij; greedily pick the experts maximising log det(K_S + lambda I),
              lambda = mean(diag K) / k. G is normalised to cosines first (G_ij / sqrt(G_ii G_jj)), so that
              diag K = I and the output norm is not counted twice;
* ``reap``    mean of g_e * ||f_e(x)|| over routed tokens (REAP, Lasby et al. 2025);
* ``ean``     sum of ||f_e(x)|| over routed tokens (expert activation norm);
* ``random``  seeded uniform scores (the control).
"""

from __future__ import annotations

import math

import torch

from moekit.errors import MoekitError
from moekit.profile.stats import ExpertStats

SCORES = ("sf", "cp", "acp", "do-acp", "reap", "ean", "random")
NEEDS = {
    "sf": ("rank_counts",),
    "cp": ("rank_counts", "selected_prob"),
    "acp": ("rank_counts", "selected_prob", "sq_norm_sum"),
    "do-acp": ("rank_counts", "selected_prob", "sq_norm_sum", "gram"),
    "reap": ("rank_counts", "reap_sum"),
    "ean": ("norm_sum",),
    "random": (),
}


def check_score(score: str) -> str:
    if score not in SCORES:
        raise MoekitError(f"unknown expert score '{score}': use one of {', '.join(SCORES)}")
    return score


def _per_selected(total: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """total / counts, 0 where the expert was never selected."""
    return torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))


def expert_scores(stats: ExpertStats, layer: int, score: str, *, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Importance of every expert of decoder layer ``layer`` [E] (higher = keep). DO-ACP returns its ACP."""
    check_score(score)
    stats.require(*NEEDS[score], what=f"the '{score}' score")
    if score == "random":
        g = torch.Generator().manual_seed(int(seed) * 100003 + int(layer))
        return torch.rand(num_experts, generator=g, dtype=torch.float64)
    if score == "ean":
        return stats.get("norm_sum", layer).double()
    counts = stats.get("rank_counts", layer).double().sum(1)
    if score == "sf":
        return counts
    if score == "reap":
        return _per_selected(stats.get("reap_sum", layer).double(), counts)
    cp = _per_selected(stats.get("selected_prob", layer).double(), counts)
    if score == "cp":
        return cp
    rms = _per_selected(stats.get("sq_norm_sum", layer).double(), counts).clamp_min(0).sqrt()
    return cp * rms  # acp, and do-acp's importance


def diversity_kernel(importance: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """K_ij = sqrt(I_i I_j) C_ij with C the cosine-normalised Gram matrix."""
    g = gram.double()
    d = g.diagonal().clamp_min(0).sqrt()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    cos = g / safe[:, None] / safe[None, :]
    cos = torch.where((d[:, None] > 0) & (d[None, :] > 0), cos, torch.eye(len(d), dtype=g.dtype))
    q = importance.double().clamp_min(0).sqrt()
    return q[:, None] * cos * q[None, :]


def greedy_logdet(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP of log det(K_S + lambda I), lambda = mean(diag K) / k; ties go to the lower index."""
    n = kernel.shape[0]
    lam = max(float(kernel.diagonal().mean()) / k, 1e-12)
    reg = kernel + lam * torch.eye(n, dtype=kernel.dtype)
    chosen: list[int] = []
    for _ in range(k):
        best, best_val = -1, -math.inf
        for j in range(n):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            sign, val = torch.linalg.slogdet(reg[idx][:, idx])
            v = float(val) if sign > 0 else -math.inf
            if v > best_val + 1e-12:
                best, best_val = j, v
        chosen.append(best if best >= 0 else next(j for j in range(n) if j not in chosen))
    return chosen


def select_experts(stats: ExpertStats, layer: int, score: str, keep: int, *, num_experts: int,
                   seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """The ``keep`` experts to concatenate (in selection order) and every expert's score [E]."""
    if not 1 <= keep <= num_experts:
        raise MoekitError(f"layer {layer}: keep {keep} must be between 1 and the {num_experts} experts of the layer")
    scores = expert_scores(stats, layer, score, num_experts=num_experts, seed=seed)
    if scores.shape[0] != num_experts:
        raise MoekitError(f"layer {layer}: the statistics hold {scores.shape[0]} experts, the model {num_experts}; "
                          "profile this model again")
    if score == "do-acp":
        gram = stats.get("gram", layer)
        return greedy_logdet(diversity_kernel(scores, gram), keep), scores
    order = sorted(range(num_experts), key=lambda e: (-float(scores[e]), e))
    return order[:keep], scores
