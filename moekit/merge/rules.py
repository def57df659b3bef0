"""Merge rules: the merged expert of a cluster as a linear combination of per-member bases.

* ``avg`` (HC-SMoE): the bases are the members' own weights, P = sum_i a_i P_i; optionally each member's
  intermediate neurons are first permuted onto the dominant member's (:func:`align_to`).
* ``select`` (moekit): the merged expert keeps the I most important of the members' n*I neurons, unchanged
  (importance: routing-weighted activation mass on calibration tokens times the neuron's down-projection
  norm, or a weight-norm proxy times frequency). Made for experts whose neurons are unrelated — experts carved
  from one dense FFN hold disjoint neurons, so averaging them mixes unrelated neurons — and exact for
  one member. Coefficients start at 1 (they scale each member's kept neurons).
* ``svd`` (the Samsung AI Challenge 2025 pipeline, Sub-MoE): [P_1 .. P_n] = U S [V_1 .. V_n] and the bases are U S V_i, so that
  P = U S sum_i a_i V_i. With every singular value kept U S V_i = P_i exactly (the SVD merge IS the
  average); with ``rank`` r the bases are projected onto the members' shared top-r output subspace.

Ungated experts (NemotronH) have no gate: every rule acts on the projections present (their weights hold no
"gate" key), and the gate's row of the coefficients goes unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.core.align import align_neurons

PROJ = ("gate", "up", "down")  # the rows of a cluster's coefficients; ungated experts have no gate


def align_to(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> torch.Tensor:
    """Permutation of ``other``'s intermediate neurons that best matches ``ref``'s (canonical single-expert
    weights gate [I,H], up [I,H], down [H,I]); maximises the summed inner products of the neurons' weights."""
    return align_neurons(ref, other, similarity="dot")[0]


def permute_expert(w: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {p: w[p][perm] for p in ("gate", "up") if p in w}
    out["down"] = w["down"][:, perm]
    for k in ("gate_b", "up_b"):
        if k in w:
            out[k] = w[k][perm]
    if "down_b" in w:
        out["down_b"] = w["down_b"]
    return out


def svd_bases(mats: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """[P_1 .. P_n] = U S [V_1 .. V_n] -> the n terms U_r S_r V_i,r (each [out, in]); their sum with
    coefficients a is the SVD merge U S sum_i a_i V_i."""
    n, _out_dim, in_dim = mats.shape
    stacked = torch.cat(list(mats.double()), dim=1)  # [out, n*in]
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    r = len(s) if rank is None else min(rank, len(s))
    us = u[:, :r] * s[:r]
    vs = vh[:r].reshape(r, n, in_dim).permute(1, 0, 2)  # V_i: [n, r, in]
    return (us @ vs).to(mats.dtype)


@dataclass
class Cluster:
    """One merged expert: its members and the linear bases of each projection (merged = sum_i a_i B_i)."""

    members: list[int]
    bases: dict[str, torch.Tensor]  # gate/up [n,I,H], down [n,H,I]; gate_b/up_b [n,I], down_b [n,H] when biased
    alpha0: torch.Tensor  # [3, n] initial coefficients, rows in PROJ order

    def merged(self, alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """sum_i a_i B_i per projection, in float32 (bases may be stored in the model's dtype: upcast here)."""
        a = self.alpha0 if alpha is None else alpha
        out = {}
        for p, row in zip(PROJ, a, strict=True):
            for key in (p, f"{p}_b"):
                if key in self.bases:
                    base = self.bases[key]
                    if len(base) == 1:  # one member: a_1 B_1 (no einsum over a copy of the whole basis)
                        out[key] = row[0].float() * base[0].float()
                    else:
                        out[key] = torch.einsum("n,n...->...", row.float(), base.float())
        return out


def assemble(clusters: list[Cluster], alphas: list[torch.Tensor] | None = None, dtype: torch.dtype | None = None):
    """Stacked merged weights: gate [E',I,H] (none for ungated experts), up, down [E',H,I] and biases (or None).

    With ``dtype`` (no gradient wanted) the result is written cluster by cluster into tensors of that dtype, so only
    one cluster's float32 copy exists at a time; without it, stacked in float32 (differentiable)."""
    if dtype is None:
        merged = [c.merged(None if alphas is None else alphas[i]) for i, c in enumerate(clusters)]
        w = {p: torch.stack([m[p] for m in merged]) for p in PROJ if p in merged[0]}
        biases = {p: torch.stack([m[f"{p}_b"] for m in merged]) for p in PROJ} if "gate_b" in merged[0] else None
        return w, biases
    w = biases = None
    with torch.no_grad():
        for i, c in enumerate(clusters):
            m = c.merged(None if alphas is None else alphas[i])
            if w is None:
                w = {p: m[p].new_empty((len(clusters), *m[p].shape), dtype=dtype) for p in PROJ if p in m}
                if "gate_b" in m:
                    biases = {p: m[f"{p}_b"].new_empty((len(clusters), *m[f"{p}_b"].shape)) for p in PROJ}
            for p in w:
                w[p][i] = m[p]
                if biases is not None:
                    biases[p][i] = m[f"{p}_b"]
    return w, biases


def select_bases(experts: list[dict[str, torch.Tensor]], importance: list[torch.Tensor],
                 ratios: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bases of the ``select`` rule: member i's basis holds its neurons among the top-I of the union (zeros
    elsewhere), so that the merged expert (coefficients 1) is exactly the selected neurons."""
    n, size = len(experts), experts[0]["up"].shape[0]
    keep = torch.topk(torch.cat(importance).float(), size).indices.sort().values
    owner, neuron, slots = keep // size, keep % size, torch.arange(size)
    bases = {}
    for p in ("gate", "up") if "gate" in experts[0] else ("up",):
        src = torch.stack([x[p] for x in experts])
        bases[p] = torch.zeros_like(src)
        bases[p][owner, slots] = src[owner, neuron]
        if f"{p}_b" in experts[0]:
            srcb = torch.stack([x[f"{p}_b"] for x in experts])
            bases[f"{p}_b"] = torch.zeros_like(srcb)
            bases[f"{p}_b"][owner, slots] = srcb[owner, neuron]
    src = torch.stack([x["down"] for x in experts])
    bases["down"] = torch.zeros_like(src)
    bases["down"][owner, :, slots] = src[owner, :, neuron]
    if "down_b" in experts[0]:  # the output bias is shared: frequency-weighted, so coefficients 1 average it
        bases["down_b"] = ratios[:, None] * torch.stack([x["down_b"] for x in experts])
    assert n == len(importance)
    return bases
