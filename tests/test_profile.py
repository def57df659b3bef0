"""The one-pass profiler against a brute-force reference that loops over tokens, on every MoE family."""

from __future__ import annotations

import pytest
import torch

from moekit.core.arch import decoder_layers, moe_layers
from moekit.errors import MoekitError
from moekit.profile.profile import ProfileConfig, profile
from moekit.profile.stats import ExpertStats
from tiny import DENSE_FAMILIES, MOE_FAMILIES, ids, tiny_model


def block_inputs(model, tokens):
    """Input of every MoE block and output of every decoder layer in a plain forward pass."""
    layers = moe_layers(model)
    inputs, hidden, handles = {}, {}, []
    for layer in layers:
        handles.append(layer.block.register_forward_pre_hook(
            lambda m, a, i=layer.index: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).clone())))
    for i, dl in enumerate(decoder_layers(model)):
        handles.append(dl.register_forward_hook(
            lambda m, a, o, i=i: hidden.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())))
    with torch.no_grad():
        logits = model(tokens).logits
    for h in handles:
        h.remove()
    return inputs, hidden, logits


@torch.no_grad()
def brute_force(model, tokens):
    """Per token, per selected expert: the statistics by their definitions."""
    inputs, hidden, _ = block_inputs(model, tokens)
    ref = {}
    for layer in moe_layers(model):
        x = inputs[layer.index]
        e_n, k = layer.num_experts, layer.top_k
        r = {n: torch.zeros(e_n, dtype=torch.float64) for n in
             ("prob_mass", "selected_prob", "weight_sum", "reap_sum", "norm_sum", "sq_norm_sum", "down_max")}
        r["rank_counts"] = torch.zeros(e_n, k, dtype=torch.float64)
        r["weighted_out"] = torch.zeros(e_n, x.shape[-1], dtype=torch.float64)
        for t in range(x.shape[0]):
            logits, w, idx = layer.route(x[t : t + 1])
            p = layer.scores(logits)[0]
            r["prob_mass"] += p.double()
            g = w[0] / w[0].sum()
            for rank in range(k):
                e = int(idx[0, rank])
                out = layer.expert_forward(e, x[t : t + 1])[0].double()
                nrm = out.norm()
                r["rank_counts"][e, rank] += 1
                r["selected_prob"][e] += p[e]
                r["weight_sum"][e] += w[0, rank]
                r["reap_sum"][e] += g[rank] * nrm
                r["norm_sum"][e] += nrm
                r["sq_norm_sum"][e] += nrm**2
                r["weighted_out"][e] += w[0, rank] * out
                r["down_max"][e] = max(r["down_max"][e], out.abs().max())
        if layer.shared_expert is not None:
            sh = layer.shared_expert
            r["shared_down_max"] = (sh.down_proj(sh.act_fn(sh.gate_proj(x)) * sh.up_proj(x))).abs().max().reshape(1)
        ref[layer.index] = r
    hm = torch.stack([hidden[i].abs().max() for i in sorted(hidden)])
    return ref, hm


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_profile_equals_brute_force(family):
    model = tiny_model(family)
    tokens = ids(batch=3, length=10)
    stats = profile(model, ProfileConfig(batch_size=2, progress=False), tokens=tokens)
    ref, hm = brute_force(model, tokens)
    assert stats.layers == sorted(ref)
    for layer, r in ref.items():
        for name, value in r.items():
            got = stats.get(name, layer).double()
            torch.testing.assert_close(got, value.double(), rtol=1e-4, atol=1e-5, msg=f"{family} {name} layer {layer}")
    torch.testing.assert_close(stats.get("hidden_max").double(), hm.double(), rtol=1e-5, atol=1e-6)
    assert stats.tokens == tokens.numel()
    assert stats.meta["num_layers"] == len(decoder_layers(model))
    stats.check_model(model)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_rank_histogram_sums(family):
    model = tiny_model(family)
    tokens = ids(batch=2, length=9)
    stats = profile(model, ProfileConfig(progress=False), tokens=tokens)
    for layer in moe_layers(model):
        rc = stats.get("rank_counts", layer.index)
        assert rc.shape == (layer.num_experts, layer.top_k)
        # every token picks exactly one expert at every rank
        assert torch.equal(rc.sum(0), torch.full((layer.top_k,), float(tokens.numel()), dtype=rc.dtype))
        if layer.family.scoring != "sigmoid":
            assert stats.get("prob_mass", layer.index).sum().item() == pytest.approx(tokens.numel(), rel=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_profile_leaves_the_model_unchanged(family):
    model = tiny_model(family)
    tokens = ids(batch=2, length=8)
    _, _, before = block_inputs(model, tokens)
    experts_forward = [type(layer.experts).forward for layer in moe_layers(model)]
    profile(model, ProfileConfig(progress=False, attn_sink=True, gram_tokens=4), tokens=tokens)
    _, _, after = block_inputs(model, tokens)
    torch.testing.assert_close(after, before)
    assert all("forward" not in layer.experts.__dict__ for layer in moe_layers(model))
    assert experts_forward == [type(layer.experts).forward for layer in moe_layers(model)]
    assert not any(layer.router._forward_hooks for layer in moe_layers(model))
    assert model.config._attn_implementation != "eager" or family == "gpt_oss"


def test_instrumented_forward_gives_the_same_logits():
    from contextlib import ExitStack

    from moekit.profile.observe import LayerAccumulator, observe_layer

    model = tiny_model("qwen3_moe")
    tokens = ids(batch=2, length=8)
    with torch.no_grad():
        plain = model(tokens).logits
        with ExitStack() as stack:
            for layer in moe_layers(model):
                stack.enter_context(observe_layer(LayerAccumulator(layer, "cpu")))
            instrumented = model(tokens).logits
    torch.testing.assert_close(instrumented, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_gram_matrix_on_sampled_tokens(family):
    from moekit.profile.profile import gram_sample

    model = tiny_model(family)
    tokens = ids(batch=3, length=8)
    n = 7
    stats = profile(model, ProfileConfig(batch_size=2, gram_tokens=n, seed=3, progress=False), tokens=tokens)
    inputs, _, _ = block_inputs(model, tokens)
    sample = gram_sample(tokens.numel(), n, 3)
    assert sample.numel() == n
    for layer in moe_layers(model):
        x = inputs[layer.index][sample]
        o = torch.stack([layer.expert_forward(e, x).double() for e in range(layer.num_experts)])
        ref = torch.einsum("esh,fsh->ef", o, o)
        torch.testing.assert_close(stats.get("gram", layer.index).double(), ref, rtol=1e-4, atol=1e-5)


def test_attention_sink_is_a_probability_per_head():
    model = tiny_model("qwen3_moe")
    stats = profile(model, ProfileConfig(attn_sink=True, progress=False), tokens=ids(batch=2, length=10))
    sink = stats.get("attn_sink")
    assert sink.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert (sink > 0).all() and (sink <= 1).all()
    assert "attn_sink" not in profile(model, ProfileConfig(progress=False), tokens=ids()).collected


def test_stats_round_trip(tmp_path):
    model = tiny_model("mixtral")
    stats = profile(model, ProfileConfig(progress=False, data={"source": "tiny"}), tokens=ids())
    path = stats.save(tmp_path / "s.safetensors")
    back = ExpertStats.load(path)
    assert back.meta["fingerprint"] == stats.meta["fingerprint"]
    assert back.meta["data"] == {"source": "tiny"}
    for key, value in stats.tensors.items():
        assert torch.equal(back.tensors[key], value)
    back.check_model(model)
    with pytest.raises(MoekitError, match="another model"):
        back.check_model(tiny_model("mixtral", seed=1))


@pytest.mark.parametrize("family", DENSE_FAMILIES[:1])
def test_dense_model_is_refused(family):
    with pytest.raises(MoekitError, match="carve"):
        profile(tiny_model(family), tokens=ids())


def test_bad_tokens_are_refused():
    model = tiny_model("qwen2_moe")
    with pytest.raises(MoekitError, match="seq-len"):
        profile(model, tokens=ids(length=1))
    with pytest.raises(MoekitError, match="n_seq, seq_len"):
        profile(model, tokens=torch.zeros(0, 5, dtype=torch.long))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_stream_equals_in_memory(family, tmp_path):
    from moekit.profile.stream import profile_stream

    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    tokens = ids(batch=5, length=10)
    cfg = ProfileConfig(batch_size=2, gram_tokens=6, attn_sink=True, progress=False)
    mem = profile(model, cfg, tokens=tokens)
    streamed = profile_stream(tmp_path, tokens, cfg, device="cpu", dtype=torch.float32)
    assert streamed.meta["fingerprint"] == mem.meta["fingerprint"]
    assert sorted(streamed.tensors) == sorted(mem.tensors)
    for key, value in mem.tensors.items():
        torch.testing.assert_close(streamed.tensors[key], value, rtol=1e-4, atol=1e-5, msg=key)
    streamed.check_model(model)


def test_stream_reads_the_non_uniform_form(tmp_path):
    from moekit.checkpoint.save import save_model
    from moekit.profile.stream import profile_stream

    model = tiny_model("qwen3_moe")
    moe_layers(model)[0].keep_experts([0, 2, 3, 5, 6])
    save_model(model, None, tmp_path / "m")
    tokens = ids(batch=3, length=8)
    cfg = ProfileConfig(batch_size=2, progress=False)
    mem = profile(model, cfg, tokens=tokens)
    streamed = profile_stream(tmp_path / "m", tokens, cfg, device="cpu", dtype=torch.float32)
    assert streamed.get("rank_counts", 0).shape == (5, 2)
    for key, value in mem.tensors.items():
        torch.testing.assert_close(streamed.tensors[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_stream_refuses_a_non_checkpoint(tmp_path):
    from moekit.profile.stream import profile_stream

    with pytest.raises(MoekitError, match="checkpoint directory"):
        profile_stream(tmp_path, ids())


def test_checkpoint_reader_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from moekit.checkpoint.safetensors_io import CheckpointReader

    tensors = {"a": torch.randn(7, 5), "b.c": torch.randn(3, 4).to(torch.bfloat16), "d": torch.arange(6)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    reader = CheckpointReader(tmp_path)
    ref = load_file(str(tmp_path / "x.safetensors"))
    for key in tensors:
        assert torch.equal(reader.tensor(key), ref[key])
    rows = torch.tensor([0, 2, 3, 4, 6])
    assert torch.equal(reader.rows("a", rows), ref["a"][rows])
    assert set(reader.read("b.")) == {"c"}
    with pytest.raises(MoekitError, match="not in the checkpoint"):
        reader.tensor("zz")
