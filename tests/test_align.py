"""Neuron alignment, the one used by merging (inner product) and densification's grouping (cosine)."""

from __future__ import annotations

import pytest
import torch

from moekit.core.align import align_neurons


def _expert(seed: int, inter: int = 12, hidden: int = 6):
    g = torch.Generator().manual_seed(seed)
    return {"gate": torch.randn(inter, hidden, generator=g), "up": torch.randn(inter, hidden, generator=g),
            "down": torch.randn(hidden, inter, generator=g)}


def _permuted(w, perm):
    return {"gate": w["gate"][perm], "up": w["up"][perm], "down": w["down"][:, perm]}


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_a_permuted_copy_is_put_back_exactly(similarity):
    ref = _expert(0)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    p, mean = align_neurons(ref, _permuted(ref, perm), similarity)
    assert torch.equal(perm[p], torch.arange(12))
    if similarity == "cosine":
        assert mean == pytest.approx(1.0)


def test_cosine_ignores_a_neurons_scale_and_dot_does_not():
    ref = _expert(0)
    other = _permuted(ref, torch.arange(12).flip(0))
    # a scaled copy of neuron 0 replaces other's neuron 5 (inner product now prefers it for several rows)
    other = {k: v.clone() for k, v in other.items()}
    p_cos, _ = align_neurons(ref, other, "cosine")
    assert torch.equal(p_cos, torch.arange(12).flip(0))
    big = {k: v.clone() for k, v in other.items()}
    big["gate"][0] *= 50
    big["up"][0] *= 50
    big["down"][:, 0] *= 50
    assert torch.equal(align_neurons(ref, big, "cosine")[0], torch.arange(12).flip(0))  # scale does not matter


def test_two_unrelated_experts_match_worse_than_a_noisy_copy():
    ref = _expert(0)
    noisy = {k: v + 0.1 * torch.randn_like(v) for k, v in ref.items()}
    assert align_neurons(ref, noisy, "cosine")[1] > align_neurons(ref, _expert(7), "cosine")[1] + 0.3


def test_unknown_similarity_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        align_neurons(_expert(0), _expert(1), "l2")
