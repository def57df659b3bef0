"""Every supported MoE family, on a tiny random model built from the family's own config class (no downloads).

One parametrised test per property, over every family in ``moekit.core.arch.MOE_FAMILIES``:
the view reads and writes the experts without changing the forward; profiling sees every MoE layer; pruning gives
exactly the original model with the removed experts' router scores masked, saved as a checkpoint plain
transformers reloads with no missing or unexpected key; merging and re-routing give models that reload with
identical logits. The deeper per-method tests (tests/test_prune.py, ...) run on the classic six."""

from __future__ import annotations

import copy

import pytest
import torch
from test_prune import _pruned_sets, fake_stats, masked_routers
from tiny import ALL_MOE_FAMILIES, ids, tiny_model

from moekit.checkpoint.load import load_model
from moekit.checkpoint.save import save_model
from moekit.core import arch

FAMILIES = pytest.mark.parametrize("family", ALL_MOE_FAMILIES)


@pytest.fixture(scope="module")
def models():
    """family -> tiny model, built once per module (tests deep-copy before changing one)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_model(family)
        return cache[family]

    return get


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_at_least_thirty_five_families_are_supported():
    assert len(ALL_MOE_FAMILIES) >= 35, ALL_MOE_FAMILIES


@FAMILIES
def test_the_view_round_trips_without_changing_the_forward(family, models):
    model = copy.deepcopy(models(family))
    x = ids()
    before = logits(model, x)
    layers = arch.moe_layers(model)
    assert layers, f"{family}: no MoE layer found"
    for layer in layers:
        layer.keep_experts(list(range(layer.num_experts)))
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
    # one expert through the view equals the experts module routing every token to it alone
    layer = layers[0]
    h = torch.randn(5, layer.hidden_size)
    with torch.no_grad():
        alone = layer.combine(h, torch.ones(5, 1), torch.full((5, 1), 3))
        torch.testing.assert_close(layer.expert_forward(3, h), alone, atol=1e-5, rtol=1e-5)


@FAMILIES
def test_profiling_sees_every_moe_layer(family, models):
    from moekit.profile.profile import ProfileConfig, profile

    model = models(family)
    stats = profile(model, ProfileConfig(progress=False), tokens=ids(batch=2, length=16))
    assert stats.layers == [layer.index for layer in arch.moe_layers(model)]
    for layer in arch.moe_layers(model):
        counts = stats.get("rank_counts", layer.index)
        slots = 2 * 16 * layer.top_k  # slots routed to zero experts (LongCat-Flash) are no expert's
        assert counts.shape[0] == layer.num_experts
        assert counts.sum() == slots if not layer.num_zero_experts else 0 < counts.sum() < slots


@FAMILIES
def test_pruning_equals_the_masked_router_and_plain_transformers_reloads_it(family, models, tmp_path):
    from transformers import AutoModelForCausalLM

    from moekit.prune.prune import PruneConfig, prune_

    reference = models(family)
    model = copy.deepcopy(reference)
    report = prune_(model, PruneConfig(criterion="reap", keep=4), stats=fake_stats(model, seed=1))
    keep = {r["layer"]: r["kept"] for r in report["layers"]}
    x = ids()
    with torch.no_grad(), masked_routers(reference, _pruned_sets(reference, keep)):
        want = reference(x).logits
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=1e-4)
    assert (logits(reference, x) - want).abs().max() > 1e-4  # pruning changed the model
    save_model(model, None, tmp_path / "pruned")
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    torch.testing.assert_close(logits(plain.eval(), x), want, atol=1e-5, rtol=1e-4)


@FAMILIES
def test_merging_and_rerouting_reload_with_identical_logits(family, models, tmp_path):
    from merge_helpers import tiny_stats

    from moekit.merge.merge import MergeConfig, merge_
    from moekit.route.route import RouteConfig, route_

    x = ids()
    calib = ids(batch=4, length=16)
    stats = tiny_stats(models(family), calib)
    merged = copy.deepcopy(models(family))
    merge_(merged, MergeConfig(target=6), stats=stats, tokens=calib)
    assert all(layer.num_experts == 6 for layer in arch.moe_layers(merged))
    routed = copy.deepcopy(models(family))
    k = arch.moe_layers(models(family))[0].min_top_k  # 1, or the fewest its experts run with (LongCat-Flash 5.24: 2)
    route_(routed, RouteConfig(top_k=k), stats=stats, tokens=calib)
    assert all(layer.top_k == k for layer in arch.moe_layers(routed))
    for name, model in (("merged", merged), ("routed", routed)):
        save_model(model, None, tmp_path / name)
        reloaded, _ = load_model(str(tmp_path / name), with_tokenizer=False)
        torch.testing.assert_close(logits(reloaded, x), logits(model, x), atol=1e-5, rtol=1e-4)


def test_an_unhandled_moe_family_is_refused_by_name_with_its_reason(char_tokenizer):
    from transformers import AutoConfig

    from moekit.errors import MoekitError

    config = AutoConfig.for_model("jetmoe")
    with pytest.raises(MoekitError, match="'jetmoe' is an MoE family moekit does not handle yet: its experts are unfused"):
        arch.check_supported(config)


def test_longcat_zero_experts_keep_their_router_rows_and_identity_output_after_pruning(models):
    """LongCat-Flash's router also scores zero (identity) experts, rows [E, E+Z): pruning and merging act on the real
    experts only; the zero experts' router rows and selection bias stay unchanged at the end, and a token routed to
    one still gets its input times the weight."""
    from moekit.errors import MoekitError

    model = copy.deepcopy(models("longcat_flash"))
    layer = arch.moe_layers(model)[0]
    e, z = layer.num_experts, layer.num_zero_experts
    assert (e, z) == (8, 2) and layer.router_weight.shape[0] == e and layer.router_linear.weight.shape[0] == e + z
    zero_rows = layer.router_linear.weight.detach()[e:].clone()
    zero_bias = layer.correction_bias.detach()[e:].clone()
    x = torch.randn(64, layer.hidden_size)
    logits_before, _, _ = layer.route(x)
    for each in arch.moe_layers(model):
        each.keep_experts([6, 1, 4, 3])
    assert layer.num_experts == 4 and model.config.n_routed_experts == 4 and model.config.zero_expert_num == 2
    assert layer.router_linear.weight.shape[0] == 6 and layer.router.n_routed_experts == 6
    if layer.zero_experts_in_block:  # transformers 5.25: the block holds the counts, gate_up has the real rows only
        assert layer.zero_experts_owner is layer.block and layer.block.num_routed_experts == 4
        assert layer.experts.gate_up_proj.shape[0] == 4 and layer.experts.num_experts == 4
    else:  # transformers 5.24: the experts module holds them, gate_up keeps the zero experts' (unused) rows
        assert layer.zero_experts_owner is layer.experts and layer.experts.num_routed_experts == 4
        assert layer.experts.gate_up_proj.shape[0] == 6 and layer.experts.total_experts == 6
    torch.testing.assert_close(layer.router_linear.weight.detach()[4:], zero_rows, atol=0, rtol=0)
    torch.testing.assert_close(layer.correction_bias.detach()[4:], zero_bias, atol=0, rtol=0)
    logits, weights, indices = layer.route(x)
    # the zero experts' logits are the same; the kept experts' are the old ones, in keep order
    torch.testing.assert_close(logits, logits_before[:, [6, 1, 4, 3, 8, 9]], atol=1e-6, rtol=1e-6)
    to_zero = indices >= 4
    assert bool(to_zero.any()) and bool((~to_zero).any())
    with torch.no_grad():
        out = layer.combine(x, weights, indices)  # the experts module's own forward
        identity = layer.zero_expert_output(x, indices, weights)
    torch.testing.assert_close(identity, x * (weights * to_zero).sum(-1, keepdim=True))
    rows = torch.zeros_like(out)  # the kept real experts' part, expert by expert
    with torch.no_grad():
        for t in range(len(x)):
            for i, w in zip(indices[t].tolist(), weights[t], strict=True):
                if i < 4:
                    rows[t] += (layer.expert_forward(i, x[t:t + 1]) * w)[0]
    torch.testing.assert_close(out, rows + identity, atol=1e-5, rtol=1e-5)
    # the block's own forward (in 5.25 the block routes the zero experts; no shared expert) equals combine's
    with torch.no_grad():
        torch.testing.assert_close(layer.block_forward(x[None])[0], out, atol=1e-5, rtol=1e-5)
    if layer.zero_experts_in_block:  # transformers 5.25: its experts run on a single slot
        assert layer.min_top_k == 1
        layer.set_top_k(1)
        logits_1, weights_1, indices_1 = layer.route(x)
        assert indices_1.shape == (64, 1) and bool((indices_1 >= 4).any())
        with torch.no_grad():
            torch.testing.assert_close(layer.block_forward(x[None])[0], layer.combine(x, weights_1, indices_1),
                                       atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(MoekitError, match="below 2"):
            layer.set_top_k(1)  # its experts' forward (transformers 5.24) fails on a single slot


def test_nemotron_h_ungated_experts_through_the_view_and_a_merge(models):
    """NemotronH's experts have no gate: y = down @ relu^2(up @ x). Only its MoE layers are viewed (not the Mamba,
    attention or dense-MLP ones); the view's weights are up and down only and its expert maths is that function; an
    expert merged with a neuron-permuted copy of itself (aligned average, full-rank SVD) computes the same function."""
    import numpy as np

    from moekit.errors import MoekitError
    from moekit.merge.merge import MergeConfig, build_clusters
    from moekit.merge.rules import assemble

    model = copy.deepcopy(models("nemotron_h"))
    layers = arch.moe_layers(model)
    assert [each.index for each in layers] == [1, 4]  # linear_attention, moe, full_attention, mlp, moe
    layer = layers[0]
    assert not layer.gated and layer.projections == ("up", "down")
    w = layer.expert_weights()
    assert set(w) == {"up", "down"} and layer.expert_param_count() == 2 * layer.expert_size * layer.hidden_size
    x = torch.randn(7, layer.hidden_size)
    with torch.no_grad():
        hidden = torch.relu(x @ w["up"][2].T).square()
        torch.testing.assert_close(layer.expert_hidden(2, x), hidden)
        torch.testing.assert_close(layer.expert_forward(2, x), hidden @ w["down"][2].T)
        perm = torch.randperm(layer.expert_size, generator=torch.Generator().manual_seed(0))
        w["up"][5], w["down"][5] = w["up"][2][perm], w["down"][2][:, perm]  # expert 5: expert 2, neurons shuffled
        layer.replace_experts(None, w["up"], w["down"], layer.router_weight.detach().clone(),
                              correction_bias=layer.correction_bias.clone())
        torch.testing.assert_close(layer.expert_forward(5, x), layer.expert_forward(2, x))
        want = layer.expert_forward(2, x)
        groups = [[0], [1], [2, 5], [3], [4, 6], [7]]  # six: n_group=2 divides it
        freq = np.array([1.0, 1, 3, 1, 1, 1, 1, 1])
        for rule in ("avg", "svd"):
            clusters = build_clusters(layer, groups, freq, MergeConfig(rule=rule, align=True, target=6))
            merged, _ = assemble(clusters)
            assert set(merged) == {"up", "down"}
            got = torch.relu(x @ merged["up"][2].T).square() @ merged["down"][2].T
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        rows = layer.router_weight.detach()[[g[0] for g in groups]]
        layer.replace_experts(None, merged["up"], merged["down"], rows)
        assert layer.num_experts == layer.router.num_experts == layer.experts.num_experts == 6
        torch.testing.assert_close(layer.expert_forward(2, x), want, atol=1e-5, rtol=1e-4)
        with pytest.raises(MoekitError, match="ungated"):  # a gate for ungated experts is a caller's bug
            layer.replace_experts(merged["up"], merged["up"], merged["down"], rows)


def test_nemotron_h_latent_experts_and_densify_are_refused_by_name_with_the_reason(models):
    """A NemotronH config with moe_latent_size (experts on a latent projection) is refused in one line naming the
    setting; densifying is refused naming the ungated experts (densify builds gated FFNs)."""
    from tiny import tiny_config

    from moekit.core.dense import dense_model_type
    from moekit.errors import MoekitError

    with pytest.raises(MoekitError, match=r"^'nemotron_h' with moe_latent_size=16 is not handled yet: its experts run "
                                          r"on a latent projection") as e:
        arch.check_supported(tiny_config("nemotron_h", moe_latent_size=16))
    assert "\n" not in str(e.value)
    assert arch.check_supported(tiny_config("nemotron_h")) == "nemotron_h"
    with pytest.raises(MoekitError, match=r"^moekit cannot densify 'nemotron_h': its experts are ungated") as e:
        dense_model_type(models("nemotron_h"))
    assert "\n" not in str(e.value)


def test_the_families_table_lists_every_supported_family(cli):
    code, out, err = cli("info", "--families", "--vllm-python", "/nonexistent-is-fine-here")
    assert code == 2 and "--vllm-python" in err  # a given interpreter that does not exist is an input error
    code, out, _ = cli("info", "--families")
    assert code == 0 and out.startswith(f"{len(ALL_MOE_FAMILIES)} supported MoE families")
    assert all(f"| {family} |" in out for family in ALL_MOE_FAMILIES)


def test_llama4_router_outputs_and_input_scaled_experts_through_the_adapter(models):
    """Llama-4's router returns (scores [T, E], logits) and its experts take [E*T, H] inputs already multiplied by the
    scores: the view translates both ways (routing / router_output), combine() equals the block's routed part, the
    instrumented (profile) forward leaves the logits unchanged and is removed on exit, ablating an expert equals its
    score set to 0, a re-routed router returns the router's own form, and compensation is refused by name."""
    from contextlib import ExitStack

    from moekit.errors import MoekitError
    from moekit.profile.ablate import ablated
    from moekit.profile.observe import LayerAccumulator, observe_layer
    from moekit.route.runtime import LayerPlan, install, uninstall

    model = copy.deepcopy(models("llama4_text"))
    layers = arch.moe_layers(model)
    layer = layers[0]
    x = torch.randn(20, layer.hidden_size)
    with torch.no_grad():
        out = layer.router(x)
        logits, weights, indices = layer.route(x)
        torch.testing.assert_close(logits, out[1], atol=0, rtol=0)
        assert torch.equal(indices, logits.topk(layer.top_k, dim=-1).indices)
        torch.testing.assert_close(weights, logits.gather(1, indices).sigmoid())
        for got, want in zip(layer.router_output(logits, weights, indices), out, strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        block = layer.block(x)[0] - layer.shared_forward(x)
        torch.testing.assert_close(layer.combine(x, weights, indices), block, atol=1e-6, rtol=1e-5)
        # the weight scales each chosen expert's input: sum_k E_k(w_k x)
        by_hand = sum(torch.stack([layer.expert_forward(int(indices[t, s]), x[t:t + 1] * weights[t, s])[0]
                                   for t in range(len(x))]) for s in range(layer.top_k))
        torch.testing.assert_close(block, by_hand, atol=1e-5, rtol=1e-5)

    tokens = ids(batch=2, length=8)
    with torch.no_grad():
        plain = model(tokens).logits
        with ExitStack() as stack:
            accs = [LayerAccumulator(each, "cpu") for each in layers]
            for acc in accs:
                stack.enter_context(observe_layer(acc))
            instrumented = model(tokens).logits
        torch.testing.assert_close(instrumented, plain, rtol=1e-5, atol=1e-5)
        assert accs[0].rank_counts.sum() == tokens.numel() * layer.top_k
        assert all("forward" not in vars(each.experts) and not each.router._forward_hooks for each in layers)

        with ablated(model, [(layer.index, 3)]):
            got = layer.block(x)[0]
        scores = out[0].clone()
        scores[:, 3] = 0
        routed_in = x.repeat(layer.num_experts, 1) * scores.transpose(0, 1).reshape(-1, 1)
        want = layer.shared_forward(x) + layer.experts(routed_in).view(layer.num_experts, len(x), -1).sum(0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

        install(layer, LayerPlan(K=2, k=1, renorm=True))  # re-routed to one expert, its weight the top-2 sum
        try:
            scores_k1, logits_k1 = layer.router(x)
            assert torch.equal((scores_k1 > 0).sum(-1), torch.ones(len(x), dtype=torch.long))
            torch.testing.assert_close(scores_k1.sum(-1), weights.sum(-1), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(logits_k1, logits, atol=0, rtol=0)
        finally:
            uninstall(layer)
        with pytest.raises(MoekitError, match="compensation is not available for llama4_text"):
            install(layer, LayerPlan(K=2, k=1, compensate=True))
