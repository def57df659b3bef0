"""Cost figures: parameters, bytes, peak forward memory, prefill/decode speed, ratios measured in one run."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from moekit.core.arch import moe_layers, param_counts
from moekit.eval.costs import CostConfig, checkpoint_bytes, compare_costs, costs_table, measure_costs, speed, weights_bytes

FAST = CostConfig(prompt_tokens=24, decode_tokens=3, repeats=1)


def test_weights_bytes_counts_tied_tensors_once():
    model = tiny_model("llama", tie_word_embeddings=True)
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() de-duplicates
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert weights_bytes(model) == params + buffers


def test_checkpoint_bytes_is_the_size_of_the_saved_files(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    files = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert checkpoint_bytes(tmp_path) == files
    st = (tmp_path / "model.safetensors").stat().st_size
    assert abs(st - weights_bytes(model)) < 0.05 * st  # the weights file holds the weights (plus a header)


def test_costs_of_one_model():
    model = tiny_model("qwen3_moe")
    c = measure_costs(model, config=FAST, progress=False)
    p = param_counts(model)
    assert (c["params_total"], c["params_experts"], c["params_active"]) == (p["total"], p["experts"], p["active"])
    layer = moe_layers(model)[0]
    assert c["params_total"] - c["params_active"] == sum(
        (m.num_experts - m.top_k) * m.expert_param_count() for m in moe_layers(model))
    assert layer.top_k < layer.num_experts
    assert c["prefill_tokens_per_s"] > 0 and c["decode_tokens_per_s"] > 0
    assert c["peak_forward_bytes"] >= 0 and c["checkpoint_bytes"] is None


def test_compare_costs_ratios_are_to_the_first_model():
    big = tiny_model("qwen3_moe")
    small = tiny_model("qwen3_moe")
    for layer in moe_layers(small):
        layer.keep_experts(torch.arange(4))  # half the experts
    c = compare_costs([big, small], config=FAST, names=["big", "small"], progress=False)
    b, s = c["models"]
    assert c["ratio"][0]["params_total"] == 1.0
    assert c["ratio"][1]["params_total"] == pytest.approx(s["params_total"] / b["params_total"])
    assert c["ratio"][1]["params_total"] < 1.0
    # same top-k and expert size: the active count differs only by the router rows of the removed experts
    removed_router = sum(a.router.weight.numel() - b_.router.weight.numel() for a, b_ in zip(moe_layers(big), moe_layers(small), strict=True))
    assert s["params_active"] == b["params_active"] - removed_router > 0
    assert c["ratio"][1]["weights_bytes"] < 1.0
    table = costs_table(c)
    assert "ratio small" in table and "params_total" in table


def test_peak_forward_memory_grows_with_the_batch():
    model = tiny_model("llama", hidden_size=64, intermediate_size=256, vocab_size=4096, max_position_embeddings=1024)
    from moekit.eval.costs import peak_forward_bytes, prompt_ids

    small = peak_forward_bytes(model, prompt_ids(model, CostConfig(prompt_tokens=16, batch_size=1)))["peak_forward_bytes"]
    large = peak_forward_bytes(model, prompt_ids(model, CostConfig(prompt_tokens=512, batch_size=8)))["peak_forward_bytes"]
    # 8 x 512 positions of 4096 logits in fp32 alone are 64 MiB
    assert large > 32 * 2**20 > small


def test_speed_returns_both_rates():
    import math

    s = speed(tiny_model("mixtral"), FAST)
    assert set(s) == {"prefill_tokens_per_s", "decode_tokens_per_s"}
    assert all(math.isfinite(v) and v > 0 for v in s.values())
