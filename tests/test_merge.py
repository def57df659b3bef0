"""Expert merging on tiny random models: exactness of the merge rules, grouping limits, learned coefficients,
a genuinely smaller model that reloads with identical logits."""

from __future__ import annotations

import functools
import itertools
import operator

import numpy as np
import pytest
import torch
from merge_helpers import tiny_stats
from scipy.cluster.hierarchy import cut_tree, linkage
from tiny import MOE_FAMILIES, ids, tiny_model

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.merge.grouping import centre_groups, hc_groups
from moekit.merge.merge import MergeConfig, _fit_row, build_clusters, merge_, plan_groups
from moekit.merge.rules import assemble, svd_bases

CALIB = {"batch": 8, "length": 24}


def _model_and_stats(family="qwen3_moe", seed=0):
    model = tiny_model(family, seed=seed)
    toks = ids(**CALIB, seed=seed)
    return model, tiny_stats(model, toks), toks


def _set_identical(layer: arch.MoELayer, members, permute=False):
    """Make experts ``members`` copies of the first (optionally with their neurons permuted)."""
    w = layer.expert_weights()
    gen = torch.Generator().manual_seed(1)
    for e in members[1:]:
        p = torch.randperm(layer.expert_size, generator=gen) if permute else torch.arange(layer.expert_size)
        w["gate"][e], w["up"][e], w["down"][e] = w["gate"][members[0]][p], w["up"][members[0]][p], w["down"][members[0]][:, p]
    layer.replace_experts(w["gate"], w["up"], w["down"], layer.router_weight.detach().clone())
    return w


@pytest.mark.parametrize("rule,align,permute", [("avg", False, False), ("svd", False, False), ("avg", True, True),
                                                ("svd", True, True)])
def test_identical_experts_merge_to_that_expert(rule, align, permute):
    model, _, _ = _model_and_stats()
    layer = arch.moe_layers(model)[0]
    w = _set_identical(layer, [1, 3, 6], permute=permute)
    freq = np.array([5.0, 3, 1, 7, 2, 2, 4, 1])
    clusters = build_clusters(layer, [[1, 3, 6]], freq, MergeConfig(target=6, rule=rule, align=align))
    merged, _ = assemble(clusters)
    for p in ("gate", "up", "down"):  # the dominant member (expert 3), in its own neuron order
        assert torch.allclose(merged[p][0], w[p][3], atol=1e-5), p
    x = torch.randn(7, layer.hidden_size)
    ref = layer.expert_forward(1, x)
    two = {p: torch.cat([merged[p], w[p][:1]]) for p in ("gate", "up", "down")}  # keep top-k = 2 experts
    layer.replace_experts(two["gate"], two["up"], two["down"], layer.router_weight.detach()[:2].clone())
    assert torch.allclose(layer.expert_forward(0, x), ref, atol=1e-5)


def test_permuted_copies_do_not_merge_exactly_without_alignment():
    model, _, _ = _model_and_stats()
    layer = arch.moe_layers(model)[0]
    w = _set_identical(layer, [1, 3], permute=True)
    merged, _ = assemble(build_clusters(layer, [[1, 3]], np.ones(8), MergeConfig(target=7)))
    assert not torch.allclose(merged["gate"][0], w["gate"][1], atol=1e-3)


def test_svd_merge_of_one_member_is_the_member_and_full_rank_equals_average():
    torch.manual_seed(0)
    one = torch.randn(1, 12, 20)
    assert torch.allclose(svd_bases(one)[0], one[0], atol=1e-5)
    many = torch.randn(3, 12, 20)
    assert torch.allclose(svd_bases(many), many, atol=1e-5)  # U S V_i = P_i with every singular value kept
    low = svd_bases(many, rank=4)
    assert torch.linalg.matrix_rank(torch.cat(list(low), 1)) == 4
    assert not torch.allclose(low, many, atol=1e-2)


def test_merged_model_is_smaller_and_reloads_with_identical_logits(tmp_path):
    from moekit.checkpoint.save import save_model
    from moekit.checkpoint.load import load_model

    model, stats, toks = _model_and_stats("qwen2_moe")
    before = arch.param_counts(model)
    report = merge_(model, MergeConfig(target=5, super_rule="none"), stats=stats, tokens=toks)
    after = arch.param_counts(model)
    per_expert = arch.moe_layers(model)[0].expert_param_count()
    assert [layer.num_experts for layer in arch.moe_layers(model)] == [5, 5]
    assert before["total"] - after["total"] == 2 * 3 * per_expert + 2 * 3 * model.config.hidden_size  # + router rows
    assert report["experts_after"] == {0: 5, 1: 5}
    save_model(model, None, tmp_path / "merged")
    reloaded, _ = load_model(str(tmp_path / "merged"), with_tokenizer=False, dtype="float32", device="cpu")
    x = ids(seed=3)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, reloaded(x).logits, atol=1e-5)


def test_non_uniform_merge_reloads(tmp_path):
    from moekit.checkpoint.save import save_model
    from moekit.checkpoint.load import load_model

    model, stats, _toks = _model_and_stats("mixtral")
    merge_(model, MergeConfig(target_total=11, super_rule="none", router="average"), stats=stats)
    counts = [layer.num_experts for layer in arch.moe_layers(model)]
    assert sum(counts) == 11
    save_model(model, None, tmp_path / "m")
    reloaded, _ = load_model(str(tmp_path / "m"), with_tokenizer=False, dtype="float32", device="cpu")
    assert [layer.num_experts for layer in arch.moe_layers(reloaded)] == counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_coefficients_never_worse_than_init_and_monotone(seed):
    model, stats, toks = _model_and_stats("olmoe", seed=seed)
    report = merge_(model, MergeConfig(target=4, learn=True, learn_router=seed == 2, steps=15, seed=seed,
                                              super_rule="none"), stats=stats, tokens=toks)
    improved = 0
    for rec in report["layers"]:
        assert rec["error_learned"] <= rec["error_init"]
        train = rec["curve"]["train"]
        assert all(b <= a for a, b in itertools.pairwise(train))
        improved += rec["error_learned"] < rec["error_init"]
    assert improved >= 1  # the fit does something somewhere


def test_learned_model_matches_reported_error():
    """The error the report claims is the error of the weights actually written."""
    model, stats, toks = _model_and_stats("qwen3_moe", seed=4)
    ref = tiny_model("qwen3_moe", seed=4)
    report = merge_(model, MergeConfig(target=5, learn=True, steps=10, super_rule="none"), stats=stats, tokens=toks)
    from moekit.merge.fit import capture_inputs, split_holdout

    layer0 = arch.moe_layers(ref)[0]
    x = capture_inputs(ref, [layer0], toks)[0]
    _, val = split_holdout(len(toks), 0.25, 0)
    xv = x[val]
    with torch.no_grad():
        y = layer0.block_forward(xv)
        y2 = arch.moe_layers(model)[0].block_forward(xv)
    err = float((y2 - y).pow(2).sum() / y.pow(2).sum())
    assert err == pytest.approx(report["layers"][0]["error_learned"], rel=1e-3)


def test_hc_matches_scipy_and_caps_cluster_size():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5))
    labels = cut_tree(linkage(x, "average"), n_clusters=4).ravel()
    expected = sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in set(labels))
    assert sorted(hc_groups(x, 4)) == expected
    capped = hc_groups(x, 4, max_size=3)
    assert len(capped) == 4 and max(map(len, capped)) <= 3
    assert sorted(functools.reduce(operator.iadd, capped, [])) == list(range(12))
    # two tight blobs are recovered
    blobs = np.concatenate([rng.normal(0, 0.01, (4, 3)), rng.normal(5, 0.01, (4, 3))])
    assert hc_groups(blobs, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(MoekitError):
        hc_groups(x, 3, max_size=3)


@pytest.mark.parametrize("mode", ["nearest", "greedy"])
def test_centre_groups(mode):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 4))
    scores = np.arange(10)[::-1].astype(float)  # expert 0 scores highest
    groups = centre_groups(x, scores, 3, max_size=4, mode=mode)
    assert len(groups) == 3 and max(map(len, groups)) <= 4
    assert sorted(functools.reduce(operator.iadd, groups, [])) == list(range(10))
    assert all(sum(c in g for c in (0, 1, 2)) == 1 for g in groups)  # one centre per group


@pytest.mark.parametrize("grouping", ["hc", "mcsmoe", "ream"])
def test_plan_respects_limits_and_super_experts(grouping):
    model, stats, _ = _model_and_stats("qwen3_moe")
    layers = arch.moe_layers(model)
    protect = [(0, 2), (1, 5)]
    cfg = MergeConfig(grouping=grouping, merges_per_layer=4, max_cluster=3, super_rule="none", protect=protect)
    plan = plan_groups(layers, stats, cfg)
    for layer in layers:
        groups = plan[layer.index]
        assert len(groups) == 8 - 4
        assert max(map(len, groups)) <= 3
        assert sorted(functools.reduce(operator.iadd, groups, [])) == list(range(8))
        for li, e in protect:
            if li == layer.index:
                assert [e] in groups


def test_super_experts_from_statistics_are_never_merged():
    model, stats, toks = _model_and_stats("qwen3_moe")
    dm0 = stats.get("down_max", 0).clone()
    dm0[3] = 1000.0  # a massive down-projection output: the one super expert (first-75% rule)
    stats.set("down_max", dm0, 0)
    router_row = arch.moe_layers(model)[0].router_weight.detach()[3].clone()
    report = merge_(model, MergeConfig(target=3, super_rule="first75"), stats=stats, tokens=toks)
    assert [3] in report["layers"][0]["groups"]
    new_row = report["layers"][0]["groups"].index([3])
    assert torch.equal(arch.moe_layers(model)[0].router_weight.detach()[new_row], router_row)


def test_global_target_spreads_over_layers():
    model, stats, _ = _model_and_stats("qwen3_moe")
    for grouping in ("hc", "mcsmoe"):
        plan = plan_groups(arch.moe_layers(model), stats, MergeConfig(grouping=grouping, target_total=9, super_rule="none"))
        assert sum(len(g) for g in plan.values()) == 9
        assert all(len(g) >= 2 for g in plan.values())  # never below top-k


def test_fitted_router_row_reproduces_member_logits_better_than_average():
    model, _, _ = _model_and_stats("qwen3_moe")
    layer = arch.moe_layers(model)[0]
    x = torch.randn(300, layer.hidden_size)
    w = layer.router_weight.detach()[[1, 4, 6]]
    avg = w.mean(0)
    row, _ = _fit_row(layer, x, w, None, avg, None)
    target = torch.logsumexp(x @ w.T, -1)
    assert (x @ row - target).pow(2).mean() < (x @ avg - target).pow(2).mean()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_family_merges_and_runs(family):
    model, stats, toks = _model_and_stats(family)
    n = 4
    report = merge_(model, MergeConfig(target=n, learn=True, steps=3, super_rule="none"), stats=stats, tokens=toks)
    assert all(layer.num_experts == n for layer in arch.moe_layers(model))
    assert all(rec["error_learned"] <= rec["error_init"] for rec in report["layers"])
    with torch.no_grad():
        assert model(toks[:2]).logits.isfinite().all()


@pytest.mark.parametrize("bad", [{}, {"target": 4, "merges_per_layer": 2}, {"target": 4, "grouping": "kmeans"},
                                 {"target": 4, "rule": "ties"}, {"target": 1}, {"merges_per_layer": 4, "max_cluster": 1}])
def test_bad_requests_are_refused(bad):
    model, stats, toks = _model_and_stats("qwen3_moe")
    with pytest.raises(MoekitError):
        merge_(model, MergeConfig(super_rule="none", **bad), stats=stats, tokens=toks)


def test_learning_without_calibration_is_refused_and_foreign_stats_too():
    model, stats, _ = _model_and_stats("qwen3_moe")
    with pytest.raises(MoekitError, match="calibration"):
        merge_(model, MergeConfig(target=4, learn=True, super_rule="none"), stats=stats)
    other = tiny_model("qwen3_moe", seed=9)
    with pytest.raises(MoekitError, match="another model"):
        merge_(other, MergeConfig(target=4, super_rule="none"), stats=stats)


def test_cli_merge_writes_smaller_model_and_report(tmp_path, char_tokenizer, capsys):
    import json

    from moekit.cli import main
    from moekit.checkpoint.save import save_model
    from moekit.checkpoint.load import load_model

    save_model(tiny_model("qwen3_moe", vocab_size=len(char_tokenizer)), char_tokenizer, tmp_path / "m", verify=False)
    model, _ = load_model(str(tmp_path / "m"), device="cpu")
    stats = tiny_stats(model, ids(**CALIB))  # profiled on the model as loaded (the fingerprint must match)
    stats.save(tmp_path / "stats.safetensors")
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"document {i}: the experts route tokens, merging keeps what matters." for i in range(40)))
    argv = ["merge", str(tmp_path / "m"), "--stats", str(tmp_path / "stats.safetensors"), "--target", "5", "--learn",
            "--steps", "3", "--data", str(text), "--n-seq", "4", "--seq-len", "32", "--super-rule", "none",
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None), capsys.readouterr().err
    merged, _ = load_model(str(tmp_path / "out"), device="cpu")
    assert [layer.num_experts for layer in arch.moe_layers(merged)] == [5, 5]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert all(r["error_learned"] <= r["error_init"] for r in report["layers"])
    with pytest.raises(SystemExit) as e:  # output exists now: refused, one line, exit 2
        main(argv)
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    # --propagate: the layer-sequential path, each layer fitted on what the merged layers before it compute
    with pytest.raises(SystemExit) as e:
        main([a for a in argv if a not in ("--learn",)][:-4] + ["--out", str(tmp_path / "prop"), "--propagate"])
    assert e.value.code in (0, None), capsys.readouterr().err
    report = json.loads((tmp_path / "prop" / "merge_report.json").read_text())
    assert report["propagate"] is True and report["mode"] == "sequential"
    merged, _ = load_model(str(tmp_path / "prop"), device="cpu")
    assert [layer.num_experts for layer in arch.moe_layers(merged)] == [5, 5]


def test_select_rule_keeps_the_most_important_neurons_unchanged():
    model, _, toks = _model_and_stats("qwen3_moe")
    layer = arch.moe_layers(model)[0]
    w = layer.expert_weights()
    half = layer.expert_size // 2
    w["down"][5][:, :half] = 0  # expert 5's first half of neurons contributes nothing
    w["down"][2][:, half:] = 0  # expert 2's second half neither
    layer.replace_experts(w["gate"], w["up"], w["down"], layer.router_weight.detach().clone())
    clusters = build_clusters(layer, [[2, 5]], np.array([1.0] * 8), MergeConfig(target=7, rule="select"))
    merged, _ = assemble(clusters)
    # the union's useful neurons are expert 2's first half and expert 5's second half, kept as they are
    x = torch.randn(9, layer.hidden_size)
    expected = layer.expert_forward(2, x) + layer.expert_forward(5, x)
    h = torch.nn.functional.silu(x @ merged["gate"][0].T) * (x @ merged["up"][0].T)
    assert torch.allclose(h @ merged["down"][0].T, expected, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_select_rule_merges_every_layout(family):
    model, stats, toks = _model_and_stats(family)
    report = merge_(model, MergeConfig(target=4, rule="select", learn=True, steps=3, super_rule="none"), stats=stats, tokens=toks)
    assert all(rec["error_learned"] <= rec["error_init"] for rec in report["layers"])
    with torch.no_grad():
        assert model(toks[:2]).logits.isfinite().all()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fast_fit_path_equals_the_whole_block(family):
    """With routing fixed, recomputing only the merged clusters' slots gives the whole block's output."""
    from moekit.merge.merge import expert_frequency
    from moekit.merge.fit import BlockFit

    model, stats, _ = _model_and_stats(family)
    layer = arch.moe_layers(model)[0]
    cfg = MergeConfig(target=4, super_rule="none")
    groups = plan_groups(arch.moe_layers(model), stats, cfg)[layer.index]
    clusters = build_clusters(layer, groups, expert_frequency(stats, layer.index), cfg)
    w, b = assemble(clusters)
    pick = [g[0] for g in groups]
    rb = None if layer.router_bias is None else layer.router_bias.detach()[pick]
    cb = None if layer.correction_bias is None else layer.correction_bias[pick]
    layer.replace_experts(w["gate"], w["up"], w["down"], layer.router_weight.detach()[pick], rb, cb, b)
    x = torch.randn(40, layer.hidden_size)
    y = layer.block_forward(x[None])[0] + 0.1
    slow, fast = BlockFit(layer, clusters, x, y, False), BlockFit(layer, clusters, x, y, True)
    alphas = [c.alpha0 * (1.3 if len(c.members) > 1 else 1.0) for c in clusters]
    rw = layer.router_weight.detach()
    assert fast.error(alphas, rw, rb).item() == pytest.approx(slow.error(alphas, rw, rb).item(), rel=1e-4)


def test_combine_skips_slots_numbered_past_the_last_expert():
    model, _, _ = _model_and_stats("olmoe")
    layer = arch.moe_layers(model)[0]
    x = torch.randn(6, layer.hidden_size)
    idx = torch.tensor([[2, 8]] * 3 + [[8, 5]] * 3)
    w = torch.full((6, 2), 0.5)
    expected = torch.cat([0.5 * layer.expert_forward(2, x[:3]), 0.5 * layer.expert_forward(5, x[3:])])
    assert torch.allclose(layer.combine(x, w, idx), expected, atol=1e-5)


def test_merging_drops_a_stale_pruning_record():
    model = tiny_model("qwen3_moe")
    model.config.moekit_kept_experts = {"source": "x", "layers": {"0": list(range(8)), "1": list(range(8))}}
    toks = ids(**CALIB)
    merge_(model, MergeConfig(target=6, super_rule="none"), stats=tiny_stats(model, toks))
    assert not hasattr(model.config, "moekit_kept_experts")


def test_bases_stay_in_the_layers_dtype_and_the_merge_is_computed_in_float32():
    """A bf16 layer: one-member clusters are views of the layer's own weights (no copy), bigger ones bf16 copies;
    the merged experts equal the float32 merge of the float32 weights, rounded once to bf16."""
    model, stats, _ = _model_and_stats()
    layer32 = arch.moe_layers(model)[0]
    w32 = {p: t.to(torch.bfloat16).float() for p, t in layer32.expert_weights().items()}
    layer32.replace_experts(w32["gate"], w32["up"], w32["down"], layer32.router_weight.detach().clone())
    ref, _ = assemble(build_clusters(layer32, [[0], [1, 3], [2, 4, 5], [6], [7]], np.arange(1.0, 9.0),
                                     MergeConfig(target=5, rule="avg")))
    model.to(torch.bfloat16)
    layer = arch.moe_layers(model)[0]
    clusters = build_clusters(layer, [[0], [1, 3], [2, 4, 5], [6], [7]], np.arange(1.0, 9.0),
                              MergeConfig(target=5, rule="avg"))
    storage = layer.experts.gate_up_proj.untyped_storage().data_ptr()
    assert clusters[0].bases["gate"].untyped_storage().data_ptr() == storage
    assert clusters[1].bases["gate"].untyped_storage().data_ptr() != storage
    assert all(b.dtype == torch.bfloat16 for c in clusters for b in c.bases.values())
    merged, _ = assemble(clusters, dtype=torch.bfloat16)
    for p in ("gate", "up", "down"):
        assert merged[p].dtype == torch.bfloat16
        assert torch.equal(merged[p], ref[p].to(torch.bfloat16)), p
        assert torch.equal(merged[p][0], layer.expert_weights()[p][0])  # a lone member is itself, bit for bit
