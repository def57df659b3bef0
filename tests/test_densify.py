"""MoE -> dense: scores, DO-ACP, exact concatenation, standard dense output that reloads."""

from __future__ import annotations

import pytest
import torch

from moekit.core import arch
from moekit.densify.densify import DensifyConfig, densify
from moekit.densify.scores import SCORES, diversity_kernel, greedy_logdet, select_experts
from moekit.errors import MoekitError
from moekit.profile.stats import fingerprint
from moekit.profile.stats import ExpertStats
from tiny import ids, tiny_model

FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3")
DENSE_OF = {"qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "mixtral": "mistral", "deepseek_v3": "deepseek_v3"}


def local_stats(model, tokens) -> ExpertStats:
    """The profiler's statistics, with the Gram matrix over every token."""
    from moekit.profile.profile import ProfileConfig, profile

    return profile(model, ProfileConfig(gram_tokens=tokens.numel(), progress=False), tokens=tokens)


def all_experts_uniform(model):
    """Every layer routes every token to every expert with equal weight (router zeroed, top-k = E)."""
    with torch.no_grad():
        for la in arch.moe_layers(model):
            la.router.weight.zero_()
            if la.n_group > 1:
                la.router.topk_group = la.n_group
            la.set_top_k(la.num_experts)
            if la.shared_gate is not None:
                la.shared_gate.weight.zero_()
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_dense_equals_moe_logits(family):
    model = all_experts_uniform(tiny_model(family))
    tokens = ids()
    stats = local_stats(model, tokens)
    e = arch.moe_layers(model)[0].num_experts
    dense = densify(model, DensifyConfig(keep=e, score="sf"), stats=stats)
    assert arch.model_type(dense) == DENSE_OF[family]
    assert not arch.moe_layers(dense)
    with torch.no_grad():
        a, b = model(tokens).logits, dense(tokens).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_ffn_equals_moe_layer_with_matching_weights(family):
    """Score-proportional down scaling: the dense FFN is the MoE layer with all experts at weights a_e."""
    model = tiny_model(family)
    with torch.no_grad():
        for la in arch.moe_layers(model):
            if la.shared_gate is not None:
                la.shared_gate.weight.zero_()
    tokens = ids(length=16)
    stats = local_stats(model, tokens)
    la = arch.moe_layers(model)[0]
    e = la.num_experts
    dense = densify(model, DensifyConfig(keep=e, score="reap", down_scaling="score", fold_routed_mass=False), stats=stats)
    sel = dense.config.moekit_densified["layers"][str(la.index)]["selected"]
    assert sorted(sel) == list(range(e))
    reap = stats.get("reap_sum", la.index) / stats.get("rank_counts", la.index).sum(1).clamp_min(1)
    a = (reap / reap.sum()).float()
    x = torch.randn(10, la.hidden_size)
    with torch.no_grad():
        expect = la.combine(x, a.expand(10, e).contiguous(), torch.arange(e).expand(10, e).contiguous())
        shared = la.shared_forward(x)
        if shared is not None:
            expect = expect + shared
        got = dense.model.layers[la.index].mlp(x)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)


def test_keep_k_builds_k_expert_width_and_record():
    model = tiny_model("qwen2_moe")
    stats = local_stats(model, ids())
    dense = densify(model, DensifyConfig(keep=3, score="acp"), stats=stats, tokens=ids(batch=1))
    la = arch.moe_layers(model)[0]
    assert dense.config.intermediate_size == 3 * la.expert_size + model.config.shared_expert_intermediate_size
    rec = dense.config.moekit_densified["layers"]
    for layer in arch.moe_layers(model):
        sel, scores = select_experts(stats, layer.index, "acp", 3, num_experts=layer.num_experts)
        assert rec[str(layer.index)]["selected"] == sel
        assert all(float(scores[s]) >= float(scores[o]) for s in sel for o in range(layer.num_experts) if o not in sel)
        assert 0 < rec[str(layer.index)]["shared_gate"] < 1  # learned gate: folded to its measured mean
    # the dense FFN carries exactly the selected experts' gate rows, in order
    g = arch.moe_layers(model)[0].expert_weights()["gate"]
    sel = rec[str(la.index)]["selected"]
    torch.testing.assert_close(dense.model.layers[la.index].mlp.gate_proj.weight[: 3 * la.expert_size],
                               torch.cat([g[s] for s in sel]))


def test_learned_shared_gate_needs_tokens():
    model = tiny_model("qwen2_moe")
    stats = local_stats(model, ids())
    with pytest.raises(MoekitError, match="shared-gate one"):
        densify(model, DensifyConfig(keep=2, score="sf"), stats=stats)
    densify(model, DensifyConfig(keep=2, score="sf", shared_gate="one"), stats=stats)


def test_qwen2_moe_without_biases_becomes_llama():
    model = tiny_model("qwen2_moe")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_proj.bias"):
                p.zero_()
    model = all_experts_uniform(model)
    stats = local_stats(model, ids())
    dense = densify(model, DensifyConfig(keep=8, score="ean"), stats=stats)
    assert arch.model_type(dense) == "llama"
    with torch.no_grad():
        torch.testing.assert_close(dense(ids()).logits, model(ids()).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("grouping", ("select", "merge"))
def test_every_score_and_grouping_gives_a_dense_model_that_reloads(tmp_path, score, grouping):
    from transformers import AutoModelForCausalLM

    from moekit.checkpoint.save import save_model

    model = tiny_model("qwen3_moe")
    stats = local_stats(model, ids())
    dense = densify(model, DensifyConfig(keep=2, score=score, grouping=grouping, down_scaling="score"), stats=stats)
    out = save_model(dense, None, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no moekit
    assert type(plain).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()).logits, dense(ids()).logits)
    # the teacher is untouched and shares no storage with the student
    dense.model.layers[0].self_attn.q_proj.weight.data.add_(1.0)
    assert not torch.equal(dense.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_merge_folds_aligned_duplicate_experts_exactly():
    """Expert 1 is expert 0 with its neurons permuted: merging 1 into 0 must give back expert 0."""
    model = tiny_model("mixtral")
    la = arch.moe_layers(model)[0]
    w = la.expert_weights()
    perm = torch.randperm(la.expert_size, generator=torch.Generator().manual_seed(1))
    w["gate"][1], w["up"][1], w["down"][1] = w["gate"][0][perm], w["up"][0][perm], w["down"][0][:, perm]
    la.replace_experts(w["gate"], w["up"], w["down"], la.router_weight.detach().clone())
    from moekit.densify.group import group_and_merge

    counts = torch.ones(la.num_experts)
    gate, _up, down, members = group_and_merge(w, [0, 2, 3, 4, 5, 6, 7], counts)
    assert members[0] == [0, 1]
    torch.testing.assert_close(gate[0], w["gate"][0])
    torch.testing.assert_close(down[0], w["down"][0])


def test_do_acp_picks_the_more_diverse_of_two_equally_important_experts():
    # expert 0: most important; experts 1 and 2 equally important; 1 is nearly parallel to 0, 2 is orthogonal
    out = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.14, 0.0], [0.0, 0.0, 1.0]])
    gram = out @ out.T
    st = ExpertStats()
    st.set("rank_counts", torch.tensor([[10.0], [10.0], [10.0]]), 0)
    st.set("selected_prob", torch.tensor([9.0, 5.0, 5.0]), 0)
    st.set("sq_norm_sum", torch.tensor([10.0, 10.0, 10.0]), 0)
    st.set("gram", gram, 0)
    sel, scores = select_experts(st, 0, "do-acp", 2, num_experts=3)
    assert sel == [0, 2]
    assert scores[1] == scores[2]
    sel_acp, _ = select_experts(st, 0, "acp", 2, num_experts=3)
    assert sel_acp == [0, 1]  # without diversity the tie goes to the redundant one


def test_greedy_logdet_prefers_orthogonal_and_handles_zero_gram():
    k = diversity_kernel(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.eye(4) + 0.9 * (1 - torch.eye(4)) * torch.tensor(
        [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert sorted(greedy_logdet(k, 3)) == [0, 2, 3]
    z = diversity_kernel(torch.zeros(3), torch.zeros(3, 3))
    assert len(set(greedy_logdet(z, 2))) == 2


def test_scores_from_statistics():
    st = ExpertStats()
    st.set("rank_counts", torch.tensor([[3.0, 1.0], [0.0, 0.0], [2.0, 0.0]]), 4)
    st.set("selected_prob", torch.tensor([2.0, 0.0, 1.0]), 4)
    st.set("sq_norm_sum", torch.tensor([16.0, 0.0, 8.0]), 4)
    st.set("reap_sum", torch.tensor([4.0, 0.0, 1.0]), 4)
    st.set("norm_sum", torch.tensor([1.0, 0.0, 7.0]), 4)
    from moekit.densify.scores import expert_scores

    def sc(name):
        return expert_scores(st, 4, name, num_experts=3).tolist()

    assert sc("sf") == [4.0, 0.0, 2.0]
    assert sc("cp") == [0.5, 0.0, 0.5]
    assert sc("acp") == pytest.approx([0.5 * 2.0, 0.0, 0.5 * 2.0])
    assert sc("reap") == [1.0, 0.0, 0.5]
    assert sc("ean") == [1.0, 0.0, 7.0]
    assert sc("random") == expert_scores(st, 4, "random", num_experts=3).tolist()
    assert sc("random") != expert_scores(st, 4, "random", num_experts=3, seed=1).tolist()


def test_bad_input_is_refused():
    model = tiny_model("qwen3_moe")
    stats = local_stats(model, ids())
    with pytest.raises(MoekitError, match="keep 9"):
        densify(model, DensifyConfig(keep=9, score="sf"), stats=stats)
    with pytest.raises(MoekitError, match="unknown expert score"):
        densify(model, DensifyConfig(keep=2, score="best"), stats=stats)
    with pytest.raises(MoekitError, match="another model"):
        densify(tiny_model("qwen3_moe", seed=1), DensifyConfig(keep=2, score="sf"), stats=stats)
    with pytest.raises(MoekitError, match="cannot densify 'olmoe'"):
        om = tiny_model("olmoe")
        densify(om, DensifyConfig(keep=2, score="sf"), stats=local_stats(om, ids()))
    with pytest.raises(MoekitError, match="dense model"):
        densify(tiny_model("llama"), DensifyConfig(keep=2), stats=stats)
    st = ExpertStats(meta={"fingerprint": fingerprint(model)})
    with pytest.raises(MoekitError, match="gram"):
        densify(model, DensifyConfig(keep=2, score="do-acp"), stats=st)


def test_cli_densify_then_distill_and_resume(tmp_path, char_tokenizer, capsys):
    import json

    from moekit.cli import main
    from moekit.checkpoint.save import save_model

    teacher = tiny_model("qwen3_moe", vocab_size=100)
    save_model(teacher, char_tokenizer, tmp_path / "moe", verify=False)
    local_stats(teacher, ids(vocab=100)).save(tmp_path / "stats.safetensors")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"doc {i} " + "the quick brown fox " * 4}) for i in range(8)))

    def run(argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        return e.value.code, capsys.readouterr()

    code, out = run(["densify", str(tmp_path / "moe"), "--stats", str(tmp_path / "stats.safetensors"), "--keep", "3",
                     "--score", "do-acp", "--out", str(tmp_path / "dense"), "--device", "cpu"])
    assert code in (0, None), out.err
    assert "qwen3" in out.out and (tmp_path / "dense" / "config.json").exists()
    code, out = run(["densify", str(tmp_path / "moe"), "--stats", str(tmp_path / "stats.safetensors"), "--keep", "3",
                     "--out", str(tmp_path / "dense"), "--device", "cpu"])
    assert code == 2 and "already exists" in out.err
    code, out = run(["densify", str(tmp_path / "moe"), "--stats", str(tmp_path / "stats.safetensors"), "--keep", "3",
                     "--score", "do-acp", "--propagate", "--data", str(data), "--n-seq", "4", "--seq-len", "16",
                     "--out", str(tmp_path / "dense-prop"), "--device", "cpu"])
    assert code in (0, None), out.err
    assert "error-propagating" in out.out and (tmp_path / "dense-prop" / "config.json").exists()
    base = ["distill", str(tmp_path / "dense"), "--teacher", str(tmp_path / "moe"), "--data", str(data), "--out",
            str(tmp_path / "kd"), "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--device", "cpu"]
    code, out = run([*base, "--steps", "2", "--checkpoint-every", "1"])
    assert code in (0, None), out.err
    assert (tmp_path / "kd" / "final" / "config.json").exists() and "tokens/s" in out.out
    code, out = run([*base, "--steps", "3"])
    assert code == 2 and "--resume" in out.err
    code, out = run([*base, "--steps", "4", "--resume"])
    assert code in (0, None), out.err
    report = json.loads((tmp_path / "kd" / "distill_report.json").read_text())
    assert report["start_step"] == 2 and report["steps_run"] == 2
