"""Grouping for densification: fold the experts not selected into the selected ones by weight clustering.

The selected experts are the cluster centres. Each other expert joins the centre whose weights it is
closest to, and each group is averaged into one expert. Experts' hidden neurons are not in corresponding
order (an expert is a set of neurons; any permutation computes the same function), so every member is
first aligned to its centre: neuron n is described by [gate row, up row, down column], and
a linear assignment (:mod:`moekit.core.align`) finds the permutation maximising the summed cosine similarity of
matched neurons. Closeness of two experts is that mean matched cosine. Members are averaged with weights
proportional to their selection counts (plus one, so unused experts still count a little).
Cost: one I x I assignment per (non-selected, selected) pair and layer.
"""

from __future__ import annotations

import torch

from moekit.core.align import align_neurons


def _expert(w: dict[str, torch.Tensor], e: int) -> dict[str, torch.Tensor]:
    return {"gate": w["gate"][e], "up": w["up"][e], "down": w["down"][e]}


def align(w: dict[str, torch.Tensor], center: int, member: int) -> tuple[torch.Tensor, float]:
    """Permutation p of ``member``'s neurons onto ``center``'s (member neuron p[n] ~ centre neuron n) and
    the mean cosine of the matched neurons."""
    return align_neurons(_expert(w, center), _expert(w, member), similarity="cosine")


def group_and_merge(w: dict[str, torch.Tensor], selected: list[int], counts: torch.Tensor):
    """Merge every expert into its closest selected one.

    Returns ``(gate [K,I,H], up [K,I,H], down [K,H,I], groups)`` in the order of ``selected``;
    ``groups[i]`` lists the experts merged into selected expert i (itself first).
    """
    others = [e for e in range(w["gate"].shape[0]) if e not in selected]
    groups = {c: [(c, None)] for c in selected}
    for m in others:
        best = max(((c, *align(w, c, m)) for c in selected), key=lambda t: t[2])
        groups[best[0]].append((m, best[1]))
    gates, ups, downs, members = [], [], [], []
    for c in selected:
        mix = torch.tensor([float(counts[e]) + 1.0 for e, _ in groups[c]], dtype=torch.float64)
        mix = mix / mix.sum()
        g = u = d = 0
        for (e, perm), a in zip(groups[c], mix.tolist(), strict=False):
            p = slice(None) if perm is None else perm
            g = g + a * w["gate"][e][p].double()
            u = u + a * w["up"][e][p].double()
            d = d + a * w["down"][e][:, p].double()
        gates.append(g)
        ups.append(u)
        downs.append(d)
        members.append([e for e, _ in groups[c]])
    dt = w["gate"].dtype
    return torch.stack(gates).to(dt), torch.stack(ups).to(dt), torch.stack(downs).to(dt), members
