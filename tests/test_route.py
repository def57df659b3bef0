"""moekit.route: fewer active experts per token, and the training-free mitigations.

Every method is checked against a reference written here from the router logits (softmax / sigmoid by hand,
top-K by hand, experts run one token at a time through ``MoELayer.expert_forward``)."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.checkpoint.save import save_model
from moekit.profile.stats import fingerprint
from moekit.checkpoint.load import load_model
from moekit.core.keys import MEAN_OUT
from moekit.route.route import RouteConfig, route_
from moekit.profile.stats import ExpertStats
from tiny import MOE_FAMILIES, ids, tiny_model

NORMALISED = {"qwen2_moe": False, "qwen3_moe": True, "mixtral": True, "olmoe": False, "deepseek_v3": True, "gpt_oss": True}


def kept_weights(family, w, keep):
    """Kept experts' original top-K weights; a router that renormalises its top-k renormalises them too."""
    kw = w * keep
    return kw * (w.sum(-1, keepdim=True) / kw.sum(-1, keepdim=True)) if NORMALISED[family] else kw


def fake_stats(model, seed: int = 0) -> ExpertStats:
    g = torch.Generator().manual_seed(seed)
    layers = arch.moe_layers(model)
    st = ExpertStats(meta={"layers": [la.index for la in layers], "fingerprint": fingerprint(model)})
    for la in layers:
        st.set("weighted_out", torch.randn(la.num_experts, la.hidden_size, generator=g) * 0.3, la.index)
        st.set("weight_sum", torch.rand(la.num_experts, generator=g) + 0.5, la.index)
    return st


def block_inputs(model, tokens) -> dict[int, torch.Tensor]:
    """What enters each MoE block when ``model`` runs ``tokens`` (captured by hooks)."""
    got, hooks = {}, []

    def hook(idx):
        def grab(_module, args):
            got[idx] = args[0].reshape(-1, args[0].shape[-1]).detach()
        return grab

    for la in arch.moe_layers(model):
        hooks.append(la.block.register_forward_pre_hook(hook(la.index)))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return got


def hand_topk(layer, x, k: int):
    """The family's routing maths at top-k, by hand from the router logits: weights, indices [T,k] by rank."""
    r = layer.router
    logits = torch.nn.functional.linear(x.float(), r.weight.float(), getattr(r, "bias", None))
    fam = layer.family.name
    if fam == "gpt_oss":
        v, i = logits.topk(k, dim=-1)
        return torch.softmax(v, dim=-1), i
    if fam == "deepseek_v3":
        s = logits.sigmoid()
        choice = s + r.e_score_correction_bias
        groups = choice.view(-1, r.num_group, layer.num_experts // r.num_group)
        gs = groups.topk(2, dim=-1).values.sum(-1)
        keep_g = gs.topk(r.topk_group, dim=-1).indices
        mask = torch.zeros_like(gs).scatter_(1, keep_g, 1).repeat_interleave(layer.num_experts // r.num_group, 1)
        i = choice.masked_fill(mask == 0, float("-inf")).topk(k, dim=-1).indices
        w = s.gather(1, i)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * r.routed_scaling_factor
        order = choice.gather(1, i).argsort(-1, descending=True)
        return w.gather(1, order), i.gather(1, order)
    p = torch.softmax(logits, dim=-1)
    v, i = p.topk(k, dim=-1)
    if NORMALISED[fam]:
        v = v / v.sum(-1, keepdim=True)
    return v, i


def hand_routed(layer, x, weights, indices):
    """sum_slots w * E_e(x), one token at a time; weight 0 slots contribute nothing."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for s in range(indices.shape[1]):
            if weights[t, s] != 0:
                out[t] += weights[t, s] * layer.expert_forward(int(indices[t, s]), x[t : t + 1])[0]
    return out


def block_out(layer, x):
    with torch.no_grad():
        out = layer.block(x[None])
    out = out[0] if isinstance(out, tuple) else out
    return out[0]


def shared(layer, x):
    s = layer.shared_forward(x)
    return 0 if s is None else s


def setup(family, **over):
    model = tiny_model(family, **over)
    tokens = ids(batch=4, length=16)
    return model, tokens, arch.moe_layers(model)


# ------------------------------------------------------------------------------------------------ unchanged at K
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_full_k_without_mitigation_leaves_model_unchanged(family):
    model, tokens, layers = setup(family)
    before = model(tokens).logits
    report = route_(model, RouteConfig(top_k=layers[0].top_k), stats=fake_stats(model), tokens=tokens)
    assert torch.equal(model(tokens).logits, before)
    assert report["average_active_experts"] == layers[0].top_k and report["form"] == "standard"
    assert not hasattr(model.config, "moekit_route")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_full_k_with_mitigations_is_numerically_unchanged(family):
    model, tokens, layers = setup(family)
    before = model(tokens).logits
    route_(model, RouteConfig(top_k=layers[0].top_k, mitigations=("renorm", "compensate", "super"),
                              super_list=[(layers[0].index, 1)]), stats=fake_stats(model), tokens=tokens)
    torch.testing.assert_close(model(tokens).logits, before, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_plain_reduction_matches_hand_topk(family):
    model, tokens, layers = setup(family, num_experts_per_tok=4)
    xs = block_inputs(model, tokens)
    report = route_(model, RouteConfig(top_k=2), stats=fake_stats(model), tokens=tokens)
    assert model.config.num_experts_per_tok == 2 and report["average_active_experts"] == 2.0
    for la in layers:
        x = xs[la.index]
        w, i = hand_topk(la, x, 2)
        torch.testing.assert_close(block_out(la, x), hand_routed(la, x, w, i) + shared(la, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_renorm_keeps_original_weight_sum(family):
    model, tokens, layers = setup(family, num_experts_per_tok=4)
    xs = block_inputs(model, tokens)
    route_(model, RouteConfig(top_k=2, mitigations=("renorm",)), stats=fake_stats(model), tokens=tokens)
    for la in layers:
        x = xs[la.index]
        w, i = hand_topk(la, x, 4)
        kept = w[:, :2] * (w.sum(-1, keepdim=True) / w[:, :2].sum(-1, keepdim=True))
        torch.testing.assert_close(block_out(la, x), hand_routed(la, x, kept, i[:, :2]) + shared(la, x),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_compensation_adds_mean_output_of_dropped_ranks(family):
    model, tokens, layers = setup(family, num_experts_per_tok=4)
    stats = fake_stats(model)
    xs = block_inputs(model, tokens)
    route_(model, RouteConfig(top_k=1, mitigations=("compensate",)), stats=stats, tokens=tokens)
    for la in layers:
        x = xs[la.index]
        w, i = hand_topk(la, x, 4)
        mu = stats.get("weighted_out", la.index) / stats.get("weight_sum", la.index)[:, None]
        comp = torch.stack([sum(w[t, s] * mu[i[t, s]] for s in range(1, 4)) for t in range(x.shape[0])])
        ref = hand_routed(la, x, w[:, :1], i[:, :1]) + comp + shared(la, x)
        torch.testing.assert_close(block_out(la, x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("rule", ["cumprob", "beta"])
def test_adaptive_threshold_matches_hand_rule(family, rule):
    model, tokens, layers = setup(family, num_experts_per_tok=4)
    xs = block_inputs(model, tokens)
    t = 0.6 if rule == "cumprob" else 0.5
    route_(model, RouteConfig(top_k=2, mitigations=("adaptive",), adaptive_rule=rule, threshold=t),
           stats=fake_stats(model), tokens=tokens)
    for la in layers:
        x = xs[la.index]
        w, i = hand_topk(la, x, 4)
        q = w / w.sum(-1, keepdim=True)
        keep = torch.zeros_like(w, dtype=torch.bool)
        for tok in range(x.shape[0]):
            if rule == "cumprob":
                n, acc = 0, 0.0
                while n < 4 and acc < t - 1e-7:
                    acc += float(q[tok, n])
                    n += 1
            else:
                n = int((q[tok] >= t * q[tok, 0]).sum())
            keep[tok, : max(n, 1)] = True
        ref = hand_routed(la, x, kept_weights(family, w, keep), i) + shared(la, x)
        torch.testing.assert_close(block_out(la, x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("mode", ["fixed", "beta"])
def test_keep_weights_leaves_the_kept_weights_unnormalised(family, mode):
    model, tokens, layers = setup(family, num_experts_per_tok=4)
    xs = block_inputs(model, tokens)
    extra = {"mitigations": ("adaptive",), "adaptive_rule": "beta", "threshold": 0.5} if mode == "beta" else {}
    report = route_(model, RouteConfig(top_k=2, keep_weights=True, **extra), stats=fake_stats(model), tokens=tokens)
    # a renormalising router needs the re-router to stop renormalising: moekit's form, not a standard checkpoint
    assert report["form"] == ("standard" if mode == "fixed" and not NORMALISED[family] else "moekit")
    for la in layers:
        x = xs[la.index]
        w, i = hand_topk(la, x, 4)
        q = w / w.sum(-1, keepdim=True)
        n = (q >= 0.5 * q[:, :1]).sum(-1) if mode == "beta" else torch.full((x.shape[0],), 2)
        keep = torch.arange(4)[None, :] < n.clamp(min=1)[:, None]
        ref = hand_routed(la, x, w * keep, i) + shared(la, x)  # the original top-4 weights, never rescaled
        torch.testing.assert_close(block_out(la, x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_super_expert_selected_by_top_k_is_never_dropped(family):
    model, tokens, layers = setup(family, num_experts_per_tok=4)
    xs = block_inputs(model, tokens)
    la0 = layers[0]
    w, i = hand_topk(la0, xs[la0.index], 4)
    sup = int(i[:, 2].mode().values)  # an expert often at rank 3: plain top-2 would drop it
    route_(model, RouteConfig(top_k=2, mitigations=("super",), super_list=[(la0.index, sup)]),
           stats=fake_stats(model), tokens=tokens)
    for la in layers:
        x = xs[la.index]
        w, i = hand_topk(la, x, 4)
        keep = torch.zeros_like(w, dtype=torch.bool)
        for tok in range(x.shape[0]):
            order = list(range(4))
            if la.index == la0.index and sup in i[tok].tolist():
                pos = i[tok].tolist().index(sup)
                order = [pos] + [r for r in order if r != pos]
            keep[tok, order[:2]] = True
        if la.index == la0.index:
            assert (keep & (i == sup)).sum() == (i == sup).sum() > 0
        ref = hand_routed(la, x, kept_weights(family, w, keep), i) + shared(la, x)
        torch.testing.assert_close(block_out(la, x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("mode", ["norm", "lsq"])
def test_rescale_folds_the_hand_computed_constant(family, mode):
    model, tokens, layers = setup(family, num_experts_per_tok=4)
    xs = block_inputs(model, tokens)
    refs = {}
    for la in layers:
        x = xs[la.index]
        full = hand_routed(la, x, *hand_topk(la, x, 4))
        kept = hand_routed(la, x, *hand_topk(la, x, 2))
        c = (full * kept).sum() / kept.pow(2).sum() if mode == "lsq" else full.norm() / kept.norm()
        refs[la.index] = c * kept + shared(la, x)
    report = route_(model, RouteConfig(top_k=2, mitigations=("rescale",), rescale_mode=mode),
                    stats=fake_stats(model), tokens=tokens)
    assert report["form"] == "standard"
    for la in layers:
        torch.testing.assert_close(block_out(la, xs[la.index]), refs[la.index], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_allocate_spends_the_budget_by_measured_sensitivity(family):
    model, tokens, layers = setup(family, num_experts_per_tok=4, num_hidden_layers=4)
    xs = block_inputs(model, tokens)
    resid = {}

    def hook(idx):
        def grab(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            resid[idx] = h.pow(2).sum(-1).reshape(-1)
        return grab

    hooks = [arch.decoder_layers(model)[la.index].register_forward_pre_hook(hook(la.index), with_kwargs=True)
             for la in layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    errors = {}
    for la in layers:
        x = xs[la.index]
        full = hand_routed(la, x, *hand_topk(la, x, 4))
        errors[la.index] = [((hand_routed(la, x, *hand_topk(la, x, k)) - full).pow(2).sum(-1) / resid[la.index]).mean()
                            for k in range(1, 5)]
    report = route_(model, RouteConfig(top_k=2.5, mitigations=("allocate",)), stats=fake_stats(model), tokens=tokens)
    ks = report["top_k_per_layer"]
    assert sum(ks.values()) == round(2.5 * len(layers))
    assert abs(report["average_active_experts"] - sum(ks.values()) / len(layers)) < 1e-9
    for la in layers:
        got = report["sensitivity"][la.index][1:]
        torch.testing.assert_close(torch.tensor(got), torch.stack(errors[la.index]).float(), atol=1e-6, rtol=1e-3)
        x = xs[la.index]
        ref = hand_routed(la, x, *hand_topk(la, x, ks[la.index])) + shared(la, x)
        torch.testing.assert_close(block_out(la, x), ref, atol=1e-5, rtol=1e-4)
    # no single move of one expert between two layers lowers the total error (greedy found a local optimum)
    total = sum(errors[idx][k - 1] for idx, k in ks.items())
    for a in ks:
        for b in ks:
            if a != b and ks[a] > 1 and ks[b] < 4:
                moved = total - errors[a][ks[a] - 1] + errors[a][ks[a] - 2] - errors[b][ks[b] - 1] + errors[b][ks[b]]
                assert moved >= total - 1e-6


# ------------------------------------------------------------------------------------------------ budget
@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("rule", ["cumprob", "beta"])
def test_adaptive_calibrated_average_equals_budget(family, rule):
    model, _, layers = setup(family, num_experts_per_tok=4)
    calib = ids(batch=8, length=32, seed=1)
    report = route_(model, RouteConfig(top_k=2.0, mitigations=("adaptive",), adaptive_rule=rule),
                    stats=fake_stats(model), tokens=calib)
    n = calib.numel() * len(layers)
    assert abs(report["measured"]["average"] - 2.0) <= 4 / n + 0.05  # a few tokens of slack: counts are integers
    assert 0 < report["routed_expert_compute_saved"] < 1


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_adaptive_eager_and_grouped_mm_agree(family):
    model, tokens, _ = setup(family, num_experts_per_tok=4)
    route_(model, RouteConfig(top_k=2, mitigations=("adaptive",), threshold=0.6), stats=fake_stats(model),
           tokens=tokens)
    model.config._experts_implementation = "eager"
    a = model(tokens).logits
    model.config._experts_implementation = "grouped_mm"
    b = model(tokens).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model.config._experts_implementation = "batched_mm"  # cannot skip: dropped slots repeat an expert at weight 0
    torch.testing.assert_close(model(tokens).logits, a, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ reload
CASES = [
    ("qwen2_moe", RouteConfig(top_k=2, mitigations=("rescale",)), "standard"),
    ("qwen3_moe", RouteConfig(top_k=2.5, mitigations=("allocate",)), "moekit"),
    ("mixtral", RouteConfig(top_k=2, mitigations=("renorm", "super"), super_list=[(0, 1)]), "moekit"),
    ("olmoe", RouteConfig(top_k=1, mitigations=("compensate", "rescale")), "moekit"),
    ("deepseek_v3", RouteConfig(top_k=2, mitigations=("adaptive", "compensate")), "moekit"),
    ("gpt_oss", RouteConfig(top_k=1.5, mitigations=("adaptive",), adaptive_rule="beta"), "moekit"),
    ("qwen3_moe", RouteConfig(top_k=2, keep_weights=True), "moekit"),
]


@pytest.mark.parametrize("family,cfg,form", CASES, ids=[c[0] for c in CASES])
def test_reload_equals_in_memory(tmp_path, family, cfg, form):
    from transformers import AutoModelForCausalLM

    model, tokens, _ = setup(family, num_experts_per_tok=4)
    report = route_(model, cfg, stats=fake_stats(model), tokens=tokens)
    assert report["form"] == form
    expected = model(tokens).logits
    save_model(model, None, tmp_path / "out")
    again, _ = load_model(str(tmp_path / "out"), with_tokenizer=False)
    torch.testing.assert_close(again(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if form == "standard":  # plain transformers gets the same model
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        torch.testing.assert_close(plain(tokens).logits, expected, atol=1e-5, rtol=1e-5)
        assert not any(k.startswith("moekit_") for k in config)
    else:  # neither plain transformers nor vLLM can pick it up by mistake and run another model
        assert any(k.startswith("moekit_") for k in config)
        assert not (tmp_path / "out" / "model.safetensors").exists()
        with pytest.raises(OSError):
            AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    if "compensate" in cfg.mitigations:
        assert all(hasattr(la.experts, MEAN_OUT) for la in arch.moe_layers(again))


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input_raises_one_line_errors():
    model, _, _ = setup("qwen3_moe", num_experts_per_tok=4)
    with pytest.raises(MoekitError, match="between 1"):
        route_(model, RouteConfig(top_k=5), stats=fake_stats(model))
    with pytest.raises(MoekitError, match="choose one"):
        route_(model, RouteConfig(top_k=2, mitigations=("renorm",), keep_weights=True), stats=fake_stats(model))
    with pytest.raises(MoekitError, match="unknown mitigation"):
        route_(model, RouteConfig(top_k=2, mitigations=("magic",)), stats=fake_stats(model))
    with pytest.raises(MoekitError, match="statistics"):
        route_(model, RouteConfig(top_k=2, mitigations=("compensate",)))
    with pytest.raises(MoekitError, match="calibration text"):
        route_(model, RouteConfig(top_k=2, mitigations=("rescale",)), stats=fake_stats(model))
    with pytest.raises(MoekitError, match="fractional"):
        route_(model, RouteConfig(top_k=1.5), stats=fake_stats(model))
    route_(model, RouteConfig(top_k=2, mitigations=("adaptive",), threshold=0.5), stats=fake_stats(model))
    with pytest.raises(MoekitError, match="already re-routed"):
        route_(model, RouteConfig(top_k=1, mitigations=("renorm",)), stats=fake_stats(model))


def word_tokenizer(vocab: int = 96):
    """A whitespace word-level tokenizer over words w0..w95 (tiny models have no tokenizer of their own)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w0", bos_token="w1", eos_token="w2")


def test_cli_route_writes_a_reloadable_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from moekit.cli import app

    model, _, _ = setup("qwen2_moe", num_experts_per_tok=4)
    save_model(model, word_tokenizer(), tmp_path / "src", verify=False)
    fake_stats(model).save(tmp_path / "stats.safetensors")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(f"w{int(t)}" for t in torch.randint(3, 96, (80,), generator=g)) for _ in range(40)]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    args = ["route", str(tmp_path / "src"), "--top-k", "2", "-m", "compensate", "-m", "rescale",
            "--stats", str(tmp_path / "stats.safetensors"), "--data", str(tmp_path / "calib.jsonl"),
            "--n-seq", "4", "--seq-len", "32", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert '"average_active_experts": 2.0' in result.output
    again, _ = load_model(str(tmp_path / "out"))
    assert again.config.num_experts_per_tok == 2 and "moekit_route" in again.config.to_dict()
    prop = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "prop"), "--propagate"])  # rescale fitted layer by layer
    assert prop.exit_code == 0, prop.output
    again, _ = load_model(str(tmp_path / "prop"))
    assert again.config.num_experts_per_tok == 2 and "moekit_route" in again.config.to_dict()
    bad = CliRunner().invoke(app, ["route", str(tmp_path / "src"), "--top-k", "2", "--per-layer", "x",
                                   "--stats", str(tmp_path / "stats.safetensors"), "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "--per-layer" in str(bad.exception or bad.output)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_with_the_real_profile(family):
    """The profiler's statistics drive compensation (mu = weighted_out / weight_sum) and super-expert keeping."""
    from moekit.profile.profile import ProfileConfig, profile

    model, tokens, layers = setup(family, num_experts_per_tok=4)
    stats = profile(model, ProfileConfig(progress=False), tokens=tokens)
    report = route_(model, RouteConfig(top_k=2, mitigations=("compensate", "super"), super_rule="first75"), stats=stats,
                    tokens=tokens)
    assert report["average_active_experts"] >= 2.0
    for la in layers:
        mu = stats.get("weighted_out", la.index).float() / stats.get("weight_sum", la.index).float().clamp_min(1e-12)[:, None]
        torch.testing.assert_close(getattr(la.experts, MEAN_OUT), mu)
    assert torch.isfinite(model(tokens).logits).all()
