"""Ablation zeroes exactly the chosen experts' contributions and reports perplexity and sink decay."""

from __future__ import annotations

import pytest
import torch

from moekit.profile.ablate import ablate, ablated, measure, parse_experts, random_experts
from moekit.core.arch import moe_layers
from moekit.errors import MoekitError
from tiny import MOE_FAMILIES, ids, tiny_model


def capture(model, tokens, layer):
    """(block input [T,H], experts-module output [T,H]) of one MoE layer in a forward pass."""
    got = {}
    h1 = layer.block.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    h2 = layer.experts.register_forward_hook(lambda m, a, o: got.__setitem__("y", o))
    with torch.no_grad():
        model(tokens)
    h1.remove()
    h2.remove()
    return got["x"], got["y"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_ablation_zeroes_exactly_those_experts(family):
    model = tiny_model(family)
    tokens = ids(batch=2, length=8)
    layer = moe_layers(model)[-1]
    dead = [1, 4]
    with ablated(model, [(layer.index, e) for e in dead]):
        x, y = capture(model, tokens, layer)
    with torch.no_grad():
        _, w, idx = layer.route(x)
        ref = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for r in range(idx.shape[1]):
                e = int(idx[t, r])
                if e not in dead:  # others keep their weight: no renormalisation
                    ref[t] += w[t, r] * layer.expert_forward(e, x[t : t + 1])[0]
    assert (idx == dead[0]).any() or (idx == dead[1]).any(), "the test needs the dead experts to be routed"
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    # hooks are gone afterwards: the full routed output is back
    _, y_after = capture(model, tokens, layer)
    assert not torch.allclose(y_after, y)


def test_ablate_reports_perplexity_and_sink_decay():
    model = tiny_model("qwen3_moe")
    tokens = ids(batch=2, length=10)
    none = ablate(model, tokens, [(0, 3)], progress=False)
    assert len(none.d_sink) == model.config.num_hidden_layers
    assert none.ppl_before > 1 and none.ppl_after > 1
    assert none.ppl_after != none.ppl_before
    assert none.d_sink[0] == pytest.approx(0.0, abs=1e-6)  # layer 0's attention comes before the ablated MoE
    all_experts = [(layer.index, e) for layer in moe_layers(model) for e in range(layer.num_experts)]
    base = measure(model, tokens, progress=False)
    every = ablate(model, tokens, all_experts, progress=False, baseline=base)
    assert every.ppl_before == none.ppl_before
    assert every.ppl_after != none.ppl_after


def test_parse_and_random_experts():
    model = tiny_model("mixtral")
    assert parse_experts("1,5; 0,2;") == [(1, 5), (0, 2)]
    with pytest.raises(MoekitError, match="LAYER,EXPERT"):
        parse_experts("1-5")
    with pytest.raises(MoekitError, match="no expert 9"):
        ablate(model, ids(), [(1, 9)])
    with pytest.raises(MoekitError, match="not an MoE layer"):
        ablate(model, ids(), [(7, 0)])
    picked = random_experts(model, 3, seed=1, exclude=[(0, 0)])
    assert len(set(picked)) == 3 and (0, 0) not in picked
    assert picked == random_experts(model, 3, seed=1, exclude=[(0, 0)])
    with pytest.raises(MoekitError, match="--random"):
        random_experts(model, 100)
