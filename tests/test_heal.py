"""Healing: the functional layer equals the module, each step lowers the layer error, guards, fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import ids, tiny_model

from moekit.core import arch
from moekit.carve.carve import CarveConfig, carve
from moekit.errors import MoekitError
from moekit.carve.heal import HealConfig, LoadBalancer, fit_down, fit_router, heal_, moe_ffn, read_layer, relative_error, write_layer


@pytest.fixture(scope="module")
def carved():
    dense = tiny_model("llama", intermediate_size=128)
    toks = ids(batch=8, length=64)
    moe = carve(dense, CarveConfig(experts=16, shared=2, active=4, k_a=8), tokens=toks, progress=False)
    return dense, moe, toks


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe"])
def test_functional_layer_equals_module_forward(family):
    model = tiny_model(family)
    x = torch.randn(40, 32)
    for layer in arch.moe_layers(model):
        t = read_layer(layer)
        with torch.no_grad():
            want = layer.block(x[None])
            want = (want[0] if isinstance(want, tuple) else want)[0]
        assert torch.allclose(moe_ffn(t, x), want, atol=1e-5), family


def test_write_layer_round_trips():
    model = tiny_model("qwen2_moe")
    layer = arch.moe_layers(model)[0]
    t = read_layer(layer)
    t.down = t.down * 2
    t.s_down = t.s_down * 3
    write_layer(layer, t)
    x = torch.randn(10, 32)
    with torch.no_grad():
        assert torch.allclose(layer.block(x[None])[0], moe_ffn(read_layer(layer), x), atol=1e-5)
        assert torch.allclose(layer.block(x[None])[0], moe_ffn(t, x), atol=1e-5)


def _layer_data(dense, moe, i, n=512):
    torch.manual_seed(i)
    x = torch.randn(n, 32)
    with torch.no_grad():
        y = arch.decoder_layers(dense)[i].mlp(x)
    return x, y


def test_least_squares_is_optimal_for_fixed_routing(carved):
    dense, moe, _ = carved
    t = read_layer(arch.moe_layers(copy.deepcopy(moe))[0])
    x, y = _layer_data(dense, moe, 0)
    before = relative_error(t, x, y)
    fit_down(t, x, y, ridge=1e-8)
    after = relative_error(t, x, y)
    assert after < before
    # optimality: any perturbation of the down projections increases the error
    for scale in (0.99, 1.01):
        t2 = copy.copy(t)
        t2.down = t.down * scale
        assert relative_error(t2, x, y) > after


def test_fitted_router_picks_high_energy_experts_better_than_chance(carved):
    dense, moe, _ = carved
    t = read_layer(arch.moe_layers(copy.deepcopy(moe))[1])
    x, _ = _layer_data(dense, moe, 1, n=2048)
    fit_router(t, x)
    from moekit.carve.heal import expert_hidden, routing

    with torch.no_grad():
        energy = torch.einsum("tei,ehi->teh", expert_hidden(t, x), t.down).pow(2).sum(-1)
        oracle = energy.topk(t.top_k, dim=1).indices
        chosen = routing(t, x) > 0
        hit = chosen.gather(1, oracle).float().mean().item()
    assert hit > 1.5 * t.top_k / t.router.shape[0]  # chance = k / E


def test_heal_lowers_every_layer_error_and_stays_standard(carved, tmp_path):
    from moekit import save_model

    dense, moe, toks = carved
    moe = copy.deepcopy(moe)
    cfg = HealConfig(local_epochs=10, local_batch=64, local_lr=1e-3)
    report = heal_(moe, cfg, tokens=toks, teacher=dense, progress=False)
    layers = report["layers"]
    assert set(layers) == {0, 1}
    for rec in layers.values():
        assert rec["lstsq"] < rec["before"] and rec["local"] <= rec["lstsq"]
        assert rec["local_holdout"][0] >= min(rec["local_holdout"])
    # the model's own block now gives what the functional layer was trained to give
    x = torch.randn(16, 32)
    for layer in arch.moe_layers(moe):
        with torch.no_grad():
            assert torch.allclose(layer.block(x[None])[0], moe_ffn(read_layer(layer), x), atol=1e-5)
    save_model(moe, None, tmp_path / "healed")  # standard checkpoint, verified


def test_local_reconstruction_lowers_training_error(carved):
    from moekit.carve.heal import fit_local

    dense, moe, _ = carved
    t = read_layer(arch.moe_layers(copy.deepcopy(moe))[0])
    x, y = _layer_data(dense, moe, 0)
    before = relative_error(t, x, y)
    errors = fit_local(t, x, y, epochs=5, lr=3e-3, batch=32, holdout=0)
    assert relative_error(t, x, y) < 0.9 * before and errors[-1] < errors[0]


def test_heal_improves_logits_against_the_dense_model(carved):
    dense, moe, toks = carved
    healed = copy.deepcopy(moe)
    heal_(healed, HealConfig(local_epochs=5, local_batch=64, local_lr=1e-3), tokens=toks, teacher=dense, progress=False)
    test = ids(batch=2, length=64, seed=7)
    with torch.no_grad():
        ref = torch.log_softmax(dense(test).logits, -1)

        def kl(m):
            return torch.nn.functional.kl_div(torch.log_softmax(m(test).logits, -1), ref, log_target=True,
                                              reduction="batchmean").item()
        assert kl(healed) < kl(moe)


def test_heal_a_pruned_moe_toward_the_original():
    teacher = tiny_model("qwen2_moe")
    student = copy.deepcopy(teacher)
    for layer in arch.moe_layers(student):
        layer.keep_experts([0, 1, 2, 3])
    cfg = HealConfig(router=False, local_epochs=3, local_batch=16, local_lr=1e-3)
    report = heal_(student, cfg, tokens=ids(batch=4, length=32), teacher=teacher, progress=False)
    for rec in report["layers"].values():
        assert rec["local"] < rec["before"]


def test_heal_refuses_unsupported_routers():
    model = tiny_model("deepseek_v3")
    with pytest.raises(MoekitError, match="softmax top-k routers"):
        heal_(model, HealConfig(), tokens=ids(batch=2, length=16), teacher=copy.deepcopy(model), progress=False)
    with pytest.raises(MoekitError, match="dense model with no MoE layers"):
        heal_(tiny_model("llama"), HealConfig(), tokens=ids(batch=2, length=16), teacher=tiny_model("llama"), progress=False)


def test_load_balancer_nudges_toward_equal_load_and_is_removed():
    model = tiny_model("qwen2_moe")
    layers = arch.moe_layers(model)
    original = layers[0].router.forward
    toks = ids(batch=2, length=32)
    with LoadBalancer(layers, gamma=0.1) as lb:
        with torch.no_grad():
            model(toks)
        load = lb.load[layers[0].index].clone()
        lb.step()
        bias = lb.bias[layers[0].index]
    assert (bias[load > load.mean()] < 0).all() and (bias[load < load.mean()] > 0).all()
    assert layers[0].router.forward == original


def test_lora_finetune_merges_back_into_a_standard_model(carved):
    dense, moe, toks = carved
    moe = copy.deepcopy(moe)
    before = {n: p.clone() for n, p in moe.named_parameters()}
    heal_(moe, HealConfig(router=False, lstsq=False, local_epochs=0, finetune="lora", finetune_steps=2,
                                       finetune_lr=1e-2), tokens=toks, teacher=dense, progress=False)
    names = {n for n, _ in moe.named_parameters()}
    assert names == set(before) and not any("lora" in n for n in names)
    assert any(not torch.equal(before[n], p) for n, p in moe.named_parameters())


def test_router_only_finetune_changes_only_routers(carved):
    dense, moe, toks = carved
    moe = copy.deepcopy(moe)
    before = {n: p.clone() for n, p in moe.named_parameters()}
    heal_(moe, HealConfig(router=False, lstsq=False, local_epochs=0, finetune="router",
                                       finetune_steps=2, finetune_lr=1e-2), tokens=toks, teacher=dense, progress=False)
    changed = {n for n, p in moe.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.endswith("mlp.gate.weight") for n in changed)


def test_distill_reduces_kl(carved):
    dense, moe, toks = carved
    moe = copy.deepcopy(moe)
    cfg1 = HealConfig(router=False, lstsq=False, local_epochs=0, distill_steps=1, distill_lr=3e-3)
    first = heal_(moe, cfg1, tokens=toks, teacher=dense, progress=False)
    cfg2 = HealConfig(router=False, lstsq=False, local_epochs=0, distill_steps=15, distill_lr=3e-3)
    second = heal_(moe, cfg2, tokens=toks, teacher=dense, progress=False)
    assert second["distill_kl"] < first["distill_kl"]


def test_heal_layer_by_layer_equals_in_memory(carved, tmp_path):
    """heal_sequential walks the MoE and its teacher one decoder layer each: the same per-layer errors and the same
    healed weights as heal_ in memory (router, lstsq and local steps), written as a standard checkpoint."""
    from transformers import AutoModelForCausalLM

    from moekit import save_model
    from moekit.carve.sequential import heal_sequential

    dense, moe, toks = carved
    save_model(moe, None, tmp_path / "moe", verify=False)
    save_model(dense, None, tmp_path / "dense", verify=False)
    cfg = HealConfig(local_epochs=2, local_batch=64, local_lr=1e-3)
    healed = copy.deepcopy(moe)
    want = heal_(healed, cfg, tokens=toks, teacher=dense, progress=False)
    got = heal_sequential(tmp_path / "moe", tmp_path / "dense", cfg, tmp_path / "out", tokens=toks,
                          dtype=torch.float32, progress=False)
    assert set(got["layers"]) == set(want["layers"]) == {0, 1}
    for i, rec in want["layers"].items():
        for key in ("before", "router", "lstsq", "local"):
            assert got["layers"][i][key] == pytest.approx(rec[key], rel=1e-4, abs=1e-6), (i, key)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for key, value in healed.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    with pytest.raises(MoekitError, match="with --mode memory"):
        heal_sequential(tmp_path / "moe", tmp_path / "dense", HealConfig(distill_steps=2), tmp_path / "x", tokens=toks)
    assert not (tmp_path / "x").exists()
