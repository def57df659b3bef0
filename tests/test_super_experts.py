"""Super-expert detection on the profiler's statistics, checked on a tiny model with a planted super expert."""

from __future__ import annotations

import pytest
import torch

from moekit.profile.ablate import ablate
from moekit.core.arch import moe_layers
from moekit.profile.profile import ProfileConfig, profile
from moekit.profile.stats import ExpertStats, massive_layers, super_expert_threshold, super_experts
from tiny import ids, tiny_model

PLANTED = (1, 5)


def planted_model(family: str = "qwen3_moe", scale: float = 300.0):
    """Four layers; expert 5 of layer 1 has its down projection scaled up: a massive-activation expert."""
    model = tiny_model(family, num_hidden_layers=4)
    layer = moe_layers(model)[PLANTED[0]]
    with torch.no_grad():
        w = layer.expert_weights()
        w["down"][PLANTED[1]] *= scale
        layer.replace_experts(w["gate"], w["up"], w["down"], layer.router_weight.detach().clone())
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_planted_super_expert_is_found(family):
    model = planted_model(family)
    stats = profile(model, ProfileConfig(progress=False), tokens=ids(batch=4, length=16))
    assert massive_layers(stats) == [PLANTED[0]]
    assert super_experts(stats, rule="paper") == [PLANTED]
    assert PLANTED in super_experts(stats, rule="first75")
    a = stats.get("down_max", PLANTED[0])
    assert a[PLANTED[1]] > super_expert_threshold(stats) >= a.max() / 10


def test_no_super_expert_in_a_plain_model():
    stats = profile(tiny_model("qwen3_moe", num_hidden_layers=4), ProfileConfig(progress=False), tokens=ids(batch=4, length=16))
    assert massive_layers(stats) == []
    assert super_experts(stats, rule="paper") == []


def test_massive_layers_follow_formation_not_persistence():
    # activations become massive after layer 2 and stay massive: layer 2 forms them, 3..5 only carry them
    stats = ExpertStats(meta={"layers": list(range(6)), "num_layers": 6})
    stats.set("hidden_max", torch.tensor([3.0, 4.0, 900.0, 950.0, 1000.0, 990.0]))
    assert massive_layers(stats) == [2]


def test_ablating_the_planted_expert_hurts_more_than_a_random_one():
    from moekit.profile.ablate import measure, random_experts

    model = planted_model()
    tokens = ids(batch=4, length=16, seed=1)
    base = measure(model, tokens, progress=False)
    sup = ablate(model, tokens, [PLANTED], progress=False, baseline=base)
    rnd = ablate(model, tokens, random_experts(model, 1, seed=0, exclude=[PLANTED]), progress=False, baseline=base)
    assert abs(sup.ppl_after - sup.ppl_before) > abs(rnd.ppl_after - rnd.ppl_before)


def test_shared_expert_carrying_the_massive_activation_is_reported():
    from moekit.profile.stats import super_shared_experts

    stats = ExpertStats(meta={"layers": [0, 1, 2, 3], "num_layers": 4})
    stats.set("hidden_max", torch.tensor([3.0, 400.0, 410.0, 405.0]))
    for layer in range(4):
        a = torch.ones(8)
        if layer == 1:
            a[2] = 60.0
        stats.set("down_max", a, layer)
        stats.set("shared_down_max", torch.tensor([300.0 if layer == 1 else 2.0]), layer)
    assert super_experts(stats) == [(1, 2)]
    assert super_shared_experts(stats) == [1]
    stats.set("shared_down_max", torch.tensor([5.0]), 1)
    assert super_shared_experts(stats) == []
