"""Neuron alignment: an expert's hidden neurons are a set (any permutation computes the same function), so
before two experts are averaged one is permuted onto the other.

Neuron n of an expert is described by its weights [gate row n, up row n, down column n] (no gate row for
ungated experts); the permutation that maximises the summed similarity of matched neurons is a linear assignment
(``scipy.optimize.linear_sum_assignment``, Hungarian method). Merging (``moekit.merge``) matches by inner
product, densification's grouping (``moekit.densify.group``) by cosine, which also measures how close two
experts are (the mean matched cosine).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

SIMILARITIES = ("dot", "cosine")


def neuron_features(w: dict[str, torch.Tensor], *, unit: bool = False) -> torch.Tensor:
    """[I, 3H] rows [gate_n, up_n, down_:,n] of one expert (gate [I,H], up [I,H], down [H,I]; [I, 2H] without a
    gate), in float64."""
    f = torch.cat([w[p] for p in ("gate", "up") if p in w] + [w["down"].T], dim=1).double()
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12) if unit else f


def align_neurons(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                  similarity: str = "dot") -> tuple[torch.Tensor, float]:
    """Permutation ``p`` of ``other``'s neurons onto ``ref``'s (other's neuron p[n] ~ ref's neuron n) and the
    mean similarity of the matched pairs."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity '{similarity}' is not one of {SIMILARITIES}")
    unit = similarity == "cosine"
    sim = neuron_features(ref, unit=unit) @ neuron_features(other, unit=unit).T
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    perm = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]
    return perm, float(sim[rows, cols].mean())
