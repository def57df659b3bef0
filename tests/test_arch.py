"""The architecture-neutral MoE view, on tiny random models of every supported family."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tiny import MOE_FAMILIES, ids, tiny_config, tiny_model

import moekit
from moekit.core.arch import describe, is_uniform, moe_layers, param_counts
from moekit.errors import MoekitError


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


@contextlib.contextmanager
def masked_router(model, removed: dict[int, list[int]]):
    """Reference: the original model with the removed experts' router scores set to -inf.

    The router's own linear projection is intercepted (only when it projects with the router weight), so
    each family's own routing maths (softmax, sigmoid + correction bias, groups, top-k) runs unchanged.
    """
    layers = {layer.index: layer for layer in moe_layers(model)}
    saved = []
    real_linear = F.linear
    for li, experts in removed.items():
        layer = layers[li]
        router = layer.router
        mask = torch.zeros(layer.num_experts)
        mask[experts] = float("-inf")
        orig_forward = router.forward

        def forward(h, _orig=orig_forward, _w=router.weight, _mask=mask):
            def linear(inp, w, b=None):
                out = real_linear(inp, w, b)
                return out + _mask.to(out.dtype) if w is _w else out

            F.linear = linear
            try:
                return _orig(h)
            finally:
                F.linear = real_linear

        router.forward = forward
        cb = layer.correction_bias
        if cb is not None:  # DeepSeek-V3 selects on sigmoid(logit) + bias: the bias must be masked too
            saved.append((cb, cb.clone()))
            cb[experts] = float("-inf")
        saved.append((router, orig_forward))
    try:
        yield model
    finally:
        for obj, val in saved:
            if isinstance(obj, torch.Tensor):
                obj.copy_(val)
            else:
                obj.forward = val


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_view_round_trip_keeps_forward(family):
    model = tiny_model(family)
    ref = logits(model)
    for layer in moe_layers(model):
        w, b = layer.expert_weights(), layer.expert_biases()
        layer.replace_experts(w["gate"], w["up"], w["down"], layer.router_weight.detach().clone(),
                              None if layer.router_bias is None else layer.router_bias.detach().clone(),
                              None if layer.correction_bias is None else layer.correction_bias.clone(), b)
    assert torch.equal(logits(model), ref)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_forward_matches_module(family):
    """Summing expert_forward over the router's choices reproduces the module's own experts forward."""
    layer = moe_layers(tiny_model(family))[0]
    x = torch.randn(7, layer.hidden_size, generator=torch.Generator().manual_seed(1))
    _, w, idx = layer.route(x)
    manual = torch.stack([
        sum(w[t, j] * layer.expert_forward(int(idx[t, j]), x[t : t + 1])[0] for j in range(idx.shape[1])) for t in range(7)
    ])
    torch.testing.assert_close(layer.combine(x, w, idx), manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_keep_all_experts_is_no_op(family):
    model = tiny_model(family)
    ref = logits(model)
    for layer in moe_layers(model):
        layer.keep_experts(range(layer.num_experts))
    assert torch.equal(logits(model), ref)
    assert is_uniform(model)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_keep_subset_equals_masked_router(family):
    model = tiny_model(family)
    first = moe_layers(model)[0]
    # keep two experts per routing group (DeepSeek-V3 has n_group=2 over 8 experts)
    keep = [0, 2, 5, 7]
    removed = [e for e in range(first.num_experts) if e not in keep]
    x = ids(length=16)
    with masked_router(model, {first.index: removed}):
        ref = logits(model, x)
    first.keep_experts(keep)
    assert first.num_experts == 4 and first.router_weight.shape[0] == 4
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)
    assert not is_uniform(model)  # other layers still hold 8


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_set_top_k_matches_model_built_with_that_k(family):
    model = tiny_model(family)
    for layer in moe_layers(model):
        layer.set_top_k(3 if family != "deepseek_v3" else 1)
    k = 3 if family != "deepseek_v3" else 1
    reference = type(model)(tiny_config(family, num_experts_per_tok=k)).eval()
    reference.load_state_dict(model.state_dict())
    assert model.config.num_experts_per_tok == k
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_save_reload_identical_and_clean(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    moekit.save_model(model, None, tmp_path / "m")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(model), logits(reloaded.eval()))


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_non_uniform_checkpoint_round_trip(family, tmp_path):
    model = tiny_model(family)
    layers = moe_layers(model)
    layers[0].keep_experts([1, 3, 4, 6])
    layers[-1].set_top_k(1)
    moekit.save_model(model, None, tmp_path / "m")
    assert (tmp_path / "m" / "moekit-model.st").exists()
    reloaded, _ = moekit.load_model(str(tmp_path / "m"), with_tokenizer=False)
    assert [layer.num_experts for layer in moe_layers(reloaded)] == [layer.num_experts for layer in layers]
    assert [layer.top_k for layer in moe_layers(reloaded)] == [layer.top_k for layer in layers]
    assert torch.equal(logits(model), logits(reloaded))


def test_guards():
    model = tiny_model("qwen3_moe")
    layer = moe_layers(model)[0]
    with pytest.raises(MoekitError, match="top-k 2 is larger than the 1 experts"):
        layer.keep_experts([3])
    with pytest.raises(MoekitError, match="out of range"):
        layer.keep_experts([0, 9])
    with pytest.raises(MoekitError, match="zero experts"):
        layer.keep_experts([])
    with pytest.raises(MoekitError, match="between 1 and"):
        layer.set_top_k(9)
    ds = moe_layers(tiny_model("deepseek_v3"))[0]
    with pytest.raises(MoekitError, match="n_group"):
        ds.keep_experts([0, 1, 2])
    assert layer.num_experts == 8 and ds.num_experts == 8  # a refused operation changes nothing


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_param_counts_and_describe(family):
    model = tiny_model(family)
    layers = moe_layers(model)
    counts = param_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_expert = layers[0].expert_param_count()
    assert counts["experts"] == sum(layer.num_experts for layer in layers) * per_expert
    assert counts["active"] == counts["total"] - counts["experts"] + sum(layer.top_k for layer in layers) * per_expert
    d = describe(model)
    assert d["moe_layers"] == len(layers) and d["experts_per_layer"] == [8] and d["top_k"] == [2]
    layers[0].keep_experts(range(4))
    assert param_counts(model)["experts"] == counts["experts"] - 4 * per_expert


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_keep_experts_selects_in_the_stored_layout(family):
    """keep_experts indexes the stored tensors: the kept experts' canonical weights (and biases) are the originals'."""
    model = tiny_model(family)
    layer = moe_layers(model)[0]
    before, biases = layer.expert_weights(), layer.expert_biases()
    router = layer.router_weight.detach().clone()
    keep = [5, 0, 3, 2]
    layer.keep_experts(keep)
    after = layer.expert_weights(copy=False)
    for p in ("gate", "up", "down"):
        assert torch.equal(after[p], before[p][keep]), p
    if biases is not None:
        assert all(torch.equal(layer.expert_biases()[p], biases[p][keep]) for p in biases)
    assert torch.equal(layer.router_weight, router[keep]) and layer.num_experts == 4
    with pytest.raises(MoekitError, match="zero experts"):
        layer.keep_experts([])
