"""Expert pruning: equivalence with router masking, no-op, guards, super experts, shard-wise == in-memory."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.profile.stats import fingerprint
from moekit.checkpoint.load import load_model
from moekit.prune.prune import CRITERIA, PruneConfig, expert_scores, make_uniform, plan, prune_
from moekit.profile.stats import ExpertStats
from tiny import MOE_FAMILIES, ids, tiny_model


def fake_stats(model, seed: int = 0, super_expert: tuple[int, int] | None = None) -> ExpertStats:
    """Statistics with distinct, seeded values for every criterion (the profiler's names and shapes)."""
    g = torch.Generator().manual_seed(seed)
    g_sq = torch.Generator().manual_seed(seed + 1)  # its own generator: the other statistics stay as they were
    layers = arch.moe_layers(model)
    n_layers = len(arch.decoder_layers(model))
    st = ExpertStats(
        meta={
            "fingerprint": fingerprint(model),
            "layers": [x.index for x in layers],
            "tokens": 1000,
            "num_layers": n_layers,
            "top_k": layers[0].top_k,
        }
    )
    for layer in layers:
        e, k = layer.num_experts, layer.top_k
        rc = torch.randint(0, 50, (e, k), generator=g).float()
        st.set("rank_counts", rc, layer.index)
        st.set("prob_mass", torch.rand(e, generator=g) * 100, layer.index)
        st.set("weight_sum", torch.rand(e, generator=g) * rc.sum(1), layer.index)
        st.set("reap_sum", torch.rand(e, generator=g) * rc.sum(1) * 3, layer.index)
        st.set("norm_sum", torch.rand(e, generator=g) * rc.sum(1) * 5, layer.index)
        st.set("sq_norm_sum", torch.rand(e, generator=g_sq) * rc.sum(1) * 25, layer.index)
        dm = 1 + torch.rand(e, generator=g)
        if super_expert and super_expert[0] == layer.index:
            dm[super_expert[1]] = 1000.0
        st.set("down_max", dm, layer.index)
    hm = torch.ones(n_layers)
    if super_expert:
        hm[super_expert[0] :] = 100.0
    st.set("hidden_max", hm)
    return st


def skew(stats: ExpertStats, model) -> None:
    """REAP scores that make a global budget (ratio 0.5) keep 5 experts in the first MoE layer, 3 in the second."""
    first, second = (layer.index for layer in arch.moe_layers(model))
    for i, reap in ((first, [1.0] * 8), (second, [0.01] * 5 + [1.0, 1.2, 1.4])):
        stats.set("rank_counts", torch.full((8, 2), 10.0), i)
        stats.set("reap_sum", torch.tensor(reap) * 20, i)


@contextmanager
def masked_routers(model, pruned: dict[int, list[int]]):
    """Reference: the original model with the pruned experts' router logits (and DeepSeek's selection
    bias) set to -inf, by intercepting the routers' own F.linear call."""
    real_linear = torch.nn.functional.linear
    masks, saved = {}, {}
    for layer in arch.moe_layers(model):
        m = torch.zeros(layer.router_linear.weight.shape[0])  # zero experts' rows (LongCat-Flash) are never masked
        m[pruned.get(layer.index, [])] = float("-inf")
        masks[layer.router_linear.weight.data_ptr()] = m
        owner = layer.selection_bias_owner
        if owner is not None:
            old = getattr(*owner)
            saved[layer.index] = (*owner, old)
            new = (old.detach() + m.to(old.dtype))
            setattr(owner[0], owner[1], torch.nn.Parameter(new, requires_grad=False) if isinstance(old, torch.nn.Parameter) else new)

    def linear(x, w, b=None):
        y = real_linear(x, w, b)
        m = masks.get(w.data_ptr())
        return y if m is None or y.shape[-1] != m.shape[0] else y + m.to(y.dtype)

    try:
        with mock.patch.object(torch.nn.functional, "linear", linear):
            yield
    finally:
        for module, name, value in saved.values():
            setattr(module, name, value)


def _pruned_sets(model, keep):
    return {
        layer.index: [e for e in range(layer.num_experts) if e not in keep[layer.index]]
        for layer in arch.moe_layers(model)
    }


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("criterion", ["reap", "topk_prime"])
def test_prune_reload_equals_masked_router(family, criterion, tmp_path):
    from moekit.checkpoint.save import save_model

    model = tiny_model(family)
    reference = copy.deepcopy(model)
    stats = fake_stats(model, seed=1)
    x = ids()
    cfg = PruneConfig(criterion=criterion, keep=4)
    report = prune_(model, cfg, stats=stats)
    keep = {r["layer"]: r["kept"] for r in report["layers"]}
    assert all(len(v) == 4 for v in keep.values())
    assert all(layer.num_experts == 4 for layer in arch.moe_layers(model))
    save_model(model, None, tmp_path / "out")
    reloaded, _ = load_model(str(tmp_path / "out"), with_tokenizer=False)
    with torch.no_grad(), masked_routers(reference, _pruned_sets(reference, keep)):
        want = reference(x).logits
    with torch.no_grad():
        got = reloaded(x).logits
        plain = reference(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (plain - want).abs().max() > 1e-3  # pruning did change the model


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "gpt_oss"])
def test_global_budget_non_uniform_equals_masked_router(family, tmp_path):
    from moekit.checkpoint.save import save_model

    model = tiny_model(family)
    reference = copy.deepcopy(model)
    stats = fake_stats(model, seed=2)
    # layer 0: one dominant expert (the rest far below its mean); layer 1: all alike -> under mean normalisation
    # layer 1 wins the free slots
    first, second = (layer.index for layer in arch.moe_layers(model))
    for i, reap in ((first, [1.0] * 7 + [100.0]), (second, [1.0] * 8)):
        stats.set("rank_counts", torch.full((8, 2), 10.0), i)
        stats.set("reap_sum", torch.tensor(reap) * 20, i)
    report = prune_(model, PruneConfig(criterion="reap", ratio=0.5, budget="global", global_norm="mean"), stats=stats)
    counts = [r["experts_after"] for r in report["layers"]]
    assert counts == [2, 6]
    assert not arch.is_uniform(model)
    save_model(model, None, tmp_path / "out")
    reloaded, _ = load_model(str(tmp_path / "out"), with_tokenizer=False)
    keep = {r["layer"]: r["kept"] for r in report["layers"]}
    x = ids()
    with torch.no_grad(), masked_routers(reference, _pruned_sets(reference, keep)):
        want = reference(x).logits
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_pruning_nothing_is_a_no_op(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg_before = model.config.to_dict()
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    report = prune_(model, PruneConfig(criterion="frequency", ratio=0.0), stats=fake_stats(model))
    assert report["experts_after"] == report["experts_before"]
    assert model.config.to_dict() == cfg_before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)


def test_criteria_rank_by_their_statistic():
    model = tiny_model("qwen3_moe")
    stats = fake_stats(model, seed=3)
    layer = arch.moe_layers(model)[0]
    i = layer.index
    rc = stats.get("rank_counts", i)
    want = {
        "topk_prime": rc[:, :1].sum(1),
        "frequency": rc.sum(1),
        "prob_mass": stats.get("prob_mass", i),
        "weighted_frequency": stats.get("weight_sum", i),
        "reap": stats.get("reap_sum", i) / rc.sum(1),
        "ean": stats.get("norm_sum", i) / rc.sum(1),
        "man": stats.get("norm_sum", i) / rc.sum(1),
        "msan": stats.get("sq_norm_sum", i) / rc.sum(1),
    }
    for c, w in want.items():
        s = expert_scores(stats, layer, PruneConfig(criterion=c, keep=4, top_k_prime=1))
        torch.testing.assert_close(s.float(), w.float())
        kept = plan([layer], stats, PruneConfig(criterion=c, keep=4, top_k_prime=1, allow_super_experts=True))[i]
        assert kept == sorted(torch.argsort(w, descending=True, stable=True)[:4].tolist())
    r1 = expert_scores(stats, layer, PruneConfig(criterion="random", keep=4, seed=0))
    r2 = expert_scores(stats, layer, PruneConfig(criterion="random", keep=4, seed=1))
    assert not torch.equal(r1, r2) and torch.equal(
        r1, expert_scores(stats, layer, PruneConfig(criterion="random", keep=4))
    )


def test_threshold_rule_keeps_experts_selected_within_top_k_prime():
    model = tiny_model("qwen3_moe")
    stats = fake_stats(model)
    for layer in arch.moe_layers(model):
        rc = torch.zeros(8, 2)
        rc[:, 0] = torch.tensor([5, 0, 0, 3, 1, 0, 2, 0.0])
        rc[:, 1] = torch.tensor([0, 4, 0, 0, 0, 1, 0, 0.0])
        stats.set("rank_counts", rc, layer.index)
    layers = arch.moe_layers(model)
    assert plan(layers, stats, PruneConfig(top_k_prime=1))[layers[0].index] == [0, 3, 4, 6]
    assert plan(layers, stats, PruneConfig(top_k_prime=2))[layers[0].index] == [0, 1, 3, 4, 5, 6]
    assert plan(layers, stats, PruneConfig(top_k_prime=1, tau=2))[layers[0].index] == [0, 3, 6]


def test_global_scores_are_normalised_per_layer():
    """A layer whose scores are 1000x larger must not win every slot: ranking is relative to the layer mean."""
    model = tiny_model("qwen3_moe")
    stats = fake_stats(model)
    layers = arch.moe_layers(model)
    stats.set("prob_mass", torch.arange(1, 9).float() * 1000, layers[0].index)
    stats.set("prob_mass", torch.arange(1, 9).float(), layers[1].index)
    for norm in ("median", "mean"):
        cfg = PruneConfig(criterion="prob_mass", ratio=0.5, budget="global", allow_super_experts=True, global_norm=norm)
        keep = plan(layers, stats, cfg)
        assert keep[layers[0].index] == keep[layers[1].index] == [4, 5, 6, 7]


def test_global_median_is_robust_to_one_outsized_expert():
    """One huge score (a super expert) must not push the rest of its layer below every other layer."""
    model = tiny_model("qwen3_moe")
    stats = fake_stats(model)
    first, second = (layer.index for layer in arch.moe_layers(model))
    stats.set("prob_mass", torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1000.0]), first)
    stats.set("prob_mass", torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]), second)
    layers = arch.moe_layers(model)
    base = dict(criterion="prob_mass", ratio=0.5, budget="global", allow_super_experts=True)
    by_mean = plan(layers, stats, PruneConfig(**base))
    by_median = plan(layers, stats, PruneConfig(**base, global_norm="median"))
    assert len(by_mean[first]) == 2  # mean: the outlier makes its layer look unimportant
    assert len(by_median[first]) == len(by_median[second]) == 4


def test_guards():
    model = tiny_model("qwen3_moe")  # top-k 2, 8 experts
    stats = fake_stats(model)
    with pytest.raises(MoekitError, match="fewer than top-k"):
        prune_(model, PruneConfig(keep=1), stats=stats)
    with pytest.raises(MoekitError, match="keep at least one"):
        prune_(model, PruneConfig(keep=0), stats=stats)
    with pytest.raises(MoekitError, match="fraction of experts removed"):
        prune_(model, PruneConfig(ratio=1.0), stats=stats)
    with pytest.raises(MoekitError, match="exceeds"):
        prune_(model, PruneConfig(keep=9), stats=stats)
    zero = fake_stats(model)
    for layer in arch.moe_layers(model):
        zero.set("rank_counts", torch.zeros(8, 2), layer.index)
    with pytest.raises(MoekitError, match="zero experts"):
        prune_(model, PruneConfig(top_k_prime=1), stats=zero)
    with pytest.raises(MoekitError, match="another model"):
        prune_(model, PruneConfig(keep=4), stats=fake_stats(tiny_model("qwen3_moe", seed=5)))
    with pytest.raises(MoekitError, match="unknown criterion"):
        prune_(model, PruneConfig(criterion="magic", keep=4), stats=stats)
    with pytest.raises(MoekitError, match="lacks"):
        bare = ExpertStats(meta=dict(stats.meta, collected=["rank_counts"]), tensors=stats.tensors)
        prune_(model, PruneConfig(criterion="reap", keep=4), stats=bare)
    assert all(layer.num_experts == 8 for layer in arch.moe_layers(model))  # nothing half-pruned

    ds = tiny_model("deepseek_v3")  # n_group 2, topk_group 1, top-k 2
    ds_stats = fake_stats(ds)
    with pytest.raises(MoekitError, match="multiple of n_group=2"):
        prune_(ds, PruneConfig(keep=5), stats=ds_stats)
    with pytest.raises(MoekitError, match="topk_group"):
        prune_(ds, PruneConfig(keep=2), stats=ds_stats)
    with pytest.raises(MoekitError, match="group-limited"):
        prune_(ds, PruneConfig(ratio=0.5, budget="global"), stats=ds_stats)


@pytest.mark.parametrize("cfg, tokens, expected", [
    (dict(ratio=0.25), True, True),  # REAP (the default criterion): error-propagating wherever tokens are at hand
    (dict(ratio=0.25, criterion="topk_prime", top_k_prime=6), True, False),  # measured worse: one pass by default
    (dict(ratio=0.25, criterion="topk_prime", top_k_prime=6, propagate=True), True, True),
    (dict(ratio=0.25, criterion="msan"), True, False),
    (dict(ratio=0.25, criterion="frequency"), True, True),
    (dict(ratio=0.25), False, False),  # none: the one-pass scores from the statistics
    (dict(ratio=0.25, propagate=False), True, False),
    (dict(keep=4, budget="global"), True, False),  # plans that cannot propagate stay one pass by default ...
    (dict(top_k_prime=6), True, False),
    (dict(ratio=0.25, criterion="aimer"), True, False),
    (dict(keep=4, budget="global", propagate=True), True, "a global budget"),  # ... and refuse it when asked
    (dict(top_k_prime=6, propagate=True), True, "threshold rule"),
    (dict(ratio=0.25, criterion="random", propagate=True), True, "reads no calibration text"),
    (dict(ratio=0.25, propagate=True), False, "give tokens"),
])
def test_when_pruning_is_error_propagating(cfg, tokens, expected):
    c = PruneConfig(**cfg)
    c.validate()
    if isinstance(expected, str):
        with pytest.raises(MoekitError, match=expected):
            c.propagates(tokens)
    else:
        assert c.propagates(tokens) is expected


def test_group_limited_pruning_is_even_per_group():
    ds = tiny_model("deepseek_v3")
    report = prune_(ds, PruneConfig(criterion="reap", keep=4), stats=fake_stats(ds, seed=4))
    for r in report["layers"]:
        assert sum(e < 4 for e in r["kept"]) == 2 and sum(e >= 4 for e in r["kept"]) == 2


@pytest.mark.parametrize("budget", ["uniform", "global"])
def test_super_experts_are_protected(budget):
    model = tiny_model("qwen3_moe")
    layer1 = arch.moe_layers(model)[1].index
    stats = fake_stats(model, super_expert=(layer1, 3))
    stats.tensors[f"rank_counts.{layer1}"][3] = 0  # never selected: every criterion but 'protected' would drop it
    stats.tensors[f"reap_sum.{layer1}"][3] = 0
    keep = plan(arch.moe_layers(model), stats, PruneConfig(criterion="reap", keep=2, budget=budget))
    assert 3 in keep[layer1]
    keep = plan(
        arch.moe_layers(model), stats, PruneConfig(criterion="reap", keep=2, budget=budget, allow_super_experts=True)
    )
    assert 3 not in keep[layer1]


def test_make_uniform_and_stats_follow_the_pruned_model():
    model = tiny_model("qwen3_moe")
    stats = fake_stats(model, seed=6)
    skew(stats, model)
    prune_(model, PruneConfig(criterion="reap", ratio=0.5, budget="global"), stats=stats)
    counts = sorted(layer.num_experts for layer in arch.moe_layers(model))
    assert counts[0] < counts[1] and not arch.is_uniform(model)
    report = make_uniform(model, stats)  # stats of the source model, re-indexed through the recorded kept experts
    assert {layer.num_experts for layer in arch.moe_layers(model)} == {counts[0]}
    assert arch.is_uniform(model)
    assert report["experts_after"] == 2 * counts[0]
    record = model.config.moekit_kept_experts
    assert record["source"] == stats.meta["fingerprint"]
    assert all(len(v) == counts[0] for v in record["layers"].values())


def test_report_table_and_plot(tmp_path):
    from moekit.prune.report import report_markdown, write_report

    model = tiny_model("qwen2_moe")
    report = prune_(model, PruneConfig(criterion="frequency", keep=6), stats=fake_stats(model))
    md = report_markdown(report)
    assert "| layer | # experts | # parameters |" in md and "8 -> 6" in md
    assert report["params_after"]["total"] < report["params_before"]["total"]
    e = arch.moe_layers(model)[0]
    assert report["params_before"]["total"] - report["params_after"]["total"] == 2 * 2 * (
        e.expert_param_count() + e.hidden_size
    )
    paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == ["prune_report.json", "prune_report.md", "experts_per_layer.png"]
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths[0].read_text())["experts_after"] == 12


@pytest.mark.parametrize(
    "family,over", [(f, {}) for f in MOE_FAMILIES] + [("qwen3_moe", {"tie_word_embeddings": True})]
    + [("nemotron_h", {})]  # ungated experts, under a renamed body (backbone.) on disk
)
def test_shardwise_equals_in_memory(family, over, tmp_path):
    from safetensors.torch import load_file

    from moekit.checkpoint.save import save_model
    from moekit.prune.shards import prune_shards

    src = tmp_path / "src"
    model = tiny_model(family, **over)
    model.save_pretrained(src, max_shard_size="20KB")  # several shards, experts split across them
    assert (src / "model.safetensors.index.json").exists()
    (src / "tokenizer_config.json").write_text("{}")
    stats = fake_stats(model, seed=7)
    cfg = PruneConfig(criterion="reap", keep=4)
    loaded, _ = load_model(str(src), with_tokenizer=False)
    mem_report = prune_(loaded, cfg, stats=stats)
    save_model(loaded, None, tmp_path / "mem")
    disk_report = prune_shards(src, stats, cfg, tmp_path / "disk")
    assert disk_report["layers"] == mem_report["layers"]
    assert disk_report["params_after"] == mem_report["params_after"]

    def tensors(d):
        out = {}
        for f in d.glob("*.safetensors"):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(tmp_path / "mem"), tensors(tmp_path / "disk")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    cm = json.loads((tmp_path / "mem" / "config.json").read_text())
    cd = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert {k: v for k, v in cm.items() if k != "transformers_version"} == {
        k: v for k, v in cd.items() if k != "transformers_version"
    }
    assert (tmp_path / "disk" / "tokenizer_config.json").exists()
    reloaded, _ = load_model(str(tmp_path / "disk"), with_tokenizer=False)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, loaded(x).logits)


def test_shardwise_refuses_non_uniform_and_existing_output(tmp_path):
    from moekit.prune.shards import prune_shards

    src = tmp_path / "src"
    model = tiny_model("qwen3_moe")
    model.save_pretrained(src)
    stats = fake_stats(model)
    skew(stats, model)
    with pytest.raises(MoekitError, match="shard-wise"):
        prune_shards(src, stats, PruneConfig(criterion="reap", ratio=0.5, budget="global"), tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep me")
    with pytest.raises(MoekitError, match="already exists"):
        prune_shards(src, stats, PruneConfig(keep=4), tmp_path / "o")
    assert (tmp_path / "o" / "x").read_text() == "keep me"


def test_every_criterion_runs_on_every_family():
    for family in MOE_FAMILIES:
        model = tiny_model(family)
        stats = fake_stats(model)
        for c in CRITERIA:
            keep = plan(arch.moe_layers(model), stats, PruneConfig(criterion=c, keep=4, top_k_prime=1))
            assert all(len(v) == 4 for v in keep.values())


def _run(argv, capsys):
    from moekit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_prune_uniform_and_errors(tmp_path, capsys, char_tokenizer):
    from moekit.checkpoint.save import save_model

    model = tiny_model("qwen3_moe")
    save_model(model, char_tokenizer, tmp_path / "m", verify=False)
    stats = fake_stats(model, seed=8)
    skew(stats, model)
    stats.save(tmp_path / "stats.safetensors")
    base = ["prune", str(tmp_path / "m"), "--stats", str(tmp_path / "stats.safetensors"), "--device", "cpu"]

    code, out, err = _run(base + ["--ratio", "0.5", "--budget", "global", "--out", str(tmp_path / "g")], capsys)
    assert code in (0, None), err
    assert "| layer | # experts | # parameters |" in out
    assert {"prune_report.json", "prune_report.md", "experts_per_layer.png"} <= {
        p.name for p in (tmp_path / "g").iterdir()
    }
    g, _ = load_model(str(tmp_path / "g"), with_tokenizer=False)
    assert not arch.is_uniform(g)

    code, _, err = _run(
        [
            "uniform",
            str(tmp_path / "g"),
            "--stats",
            str(tmp_path / "stats.safetensors"),
            "--out",
            str(tmp_path / "u"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code in (0, None), err
    u, _ = load_model(str(tmp_path / "u"), with_tokenizer=False)
    assert arch.is_uniform(u) and len({layer.num_experts for layer in arch.moe_layers(u)}) == 1

    code, _, err = _run(base + ["--keep", "4", "--shardwise", "--out", str(tmp_path / "s")], capsys)
    assert code in (0, None), err
    s, _ = load_model(str(tmp_path / "s"))  # tokenizer files came along
    assert {layer.num_experts for layer in arch.moe_layers(s)} == {4}

    text = tmp_path / "calib.txt"
    text.write_text("Mixture-of-experts models route each token to a few experts. " * 20)
    with_data = ["--data", str(text), "--n-seq", "2", "--seq-len", "16"]
    for extra, said in ((["--criterion", "msan"], "criterion 'msan' is scored in one pass by default"),
                        (["--no-propagate"], "--data is not used: --no-propagate"),
                        ([], None)):  # reap: error-propagating, so --data is used
        out_dir = tmp_path / f"d{len(extra)}{extra[-1] if extra else ''}"
        code, _, err = _run(base + ["--ratio", "0.5", *with_data, *extra, "--out", str(out_dir)], capsys)
        assert code in (0, None), err
        assert (said in err) if said else ("--data is not used" not in err)
        assert ("propagate" in json.loads((out_dir / "prune_report.json").read_text())) == (said is None)

    code, _, err = _run(base + ["--keep", "1", "--out", str(tmp_path / "bad")], capsys)
    errors = [line for line in err.splitlines() if line.startswith("moekit: error:")]
    assert code == 2 and len(errors) == 1 and "fewer than top-k" in errors[0]
    assert not (tmp_path / "bad").exists()
    code, _, err = _run(base + ["--keep", "4", "--ratio", "0.5", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "not both" in err
    code, _, err = _run(base + ["--keep", "4", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_prune_from_real_profile(family):
    """Statistics from moekit.profile: the never-selected experts go first under frequency."""
    from moekit.profile.profile import ProfileConfig, profile

    model = tiny_model(family)
    stats = profile(model, ProfileConfig(progress=False), tokens=ids(batch=4, length=16, seed=3))
    counts = {layer.index: stats.get("rank_counts", layer.index).sum(1) for layer in arch.moe_layers(model)}
    for c in CRITERIA:
        report = prune_(copy.deepcopy(model), PruneConfig(criterion=c, ratio=0.25), stats=stats)
        assert report["experts_after"] == 12
    report = prune_(model, PruneConfig(criterion="frequency", keep=6, allow_super_experts=True), stats=stats)
    for r in report["layers"]:
        dropped = [e for e in range(8) if e not in r["kept"]]
        assert min(counts[r["layer"]][r["kept"]]) >= max(counts[r["layer"]][dropped])
