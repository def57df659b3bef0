"""The AIMER (weights only), MAN (= ean) and MSAN pruning criteria: scores by their definitions on tiny models
whose answer is known by construction, pruning without statistics, and the command line."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.profile.profile import ProfileConfig, profile
from moekit.prune.prune import CALIBRATION_FREE, PruneConfig, aimer, expert_scores, plan, prune_
from tiny import ids, tiny_model


@torch.no_grad()
def _shape_experts(layer) -> None:
    """Expert 0: every weight the same magnitude (AIMER 1, pruned first); expert 1: 95% of its weights zero (AIMER
    far below the ~0.8 of Gaussian weights, kept first); expert 2: scaled by 10 (AIMER unchanged)."""
    g = torch.Generator().manual_seed(0)
    for w in (layer.experts.gate_up_proj, layer.experts.down_proj):
        w[0] = w[0].sign() * 0.02
        w[1] = w[1] * (torch.rand(w[1].shape, generator=g) < 0.05)
        w[2] = w[2] * 10


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_aimer_is_mean_abs_over_rms_of_the_expert_weights(family):
    model = tiny_model(family)
    layer = arch.moe_layers(model)[0]
    before = aimer(layer)
    _shape_experts(layer)
    w = layer.expert_weights()  # canonical gate / up / down copies: an independent route to the same weights
    flat = torch.cat([w[n].flatten(1) for n in ("gate", "up", "down")], dim=1).double()
    direct = flat.abs().mean(1) / flat.square().mean(1).sqrt()
    torch.testing.assert_close(aimer(layer), direct)
    assert aimer(layer)[0].item() == pytest.approx(1.0)
    torch.testing.assert_close(aimer(layer)[2], before[2])  # scale-free
    cfg = PruneConfig(criterion="aimer", keep=6)
    scores = expert_scores(None, layer, cfg)
    torch.testing.assert_close(scores, 1 / direct)  # higher = keep: the paper prunes the highest AIMER
    assert int(scores.argmin()) == 0 and int(scores.argmax()) == 1
    kept = plan([layer], None, cfg)[layer.index]
    assert 0 not in kept and 1 in kept and len(kept) == 6


def test_calibration_free_criteria_prune_without_statistics():
    assert set(CALIBRATION_FREE) == {"aimer", "random"}
    model = tiny_model("qwen3_moe")
    _shape_experts(arch.moe_layers(model)[0])
    report = prune_(model, PruneConfig(criterion="aimer", ratio=0.25), stats=None)
    assert report["experts_after"] == 12 and 0 not in report["layers"][0]["kept"]
    stats = profile(tiny_model("qwen3_moe"), ProfileConfig(progress=False), tokens=ids(batch=2, length=8))
    for c in ("reap", "man", "msan", "frequency"):
        with pytest.raises(MoekitError, match=f"criterion '{c}' needs expert statistics"):
            prune_(tiny_model("qwen3_moe"), PruneConfig(criterion=c, ratio=0.25), stats=None)
    # with statistics the same ranking, and the statistics' super experts are protected as for every criterion
    with_stats = prune_(tiny_model("qwen3_moe"), PruneConfig(criterion="aimer", ratio=0.25, allow_super_experts=True),
                        stats=stats)
    without = prune_(tiny_model("qwen3_moe"), PruneConfig(criterion="aimer", ratio=0.25), stats=None)
    assert [r["kept"] for r in with_stats["layers"]] == [r["kept"] for r in without["layers"]]


def test_aimer_refuses_weights_not_in_memory(tmp_path):
    from moekit.prune.shards import prune_shards

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(MoekitError, match="not in memory"):
        prune_shards(tmp_path / "m", None, PruneConfig(criterion="aimer", keep=4), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@torch.no_grad()
def _routed_norms(model, tokens, layer) -> dict[int, torch.Tensor]:
    """Per expert of ``layer``: ||E_e(x)||_2 on every token routed to it, computed directly (no profiler)."""
    seen = {}
    h = layer.block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    model(tokens)
    h.remove()
    x = seen["x"]
    _, _, idx = layer.route(x)
    return {e: layer.expert_forward(e, x[(idx == e).any(1)]).double().norm(dim=-1) for e in range(layer.num_experts)}


def test_man_is_ean_and_msan_is_the_mean_squared_norm_over_routed_tokens():
    model = tiny_model("qwen3_moe")
    tokens = ids(batch=4, length=16, seed=1)
    layer = arch.moe_layers(model)[0]
    with torch.no_grad():
        layer.experts.down_proj[3] *= 4  # expert 3's output x4: its MAN x4, MSAN x16; the layer's routing unchanged
    stats = profile(model, ProfileConfig(progress=False), tokens=tokens)
    norms = _routed_norms(model, tokens, layer)
    z = torch.zeros((), dtype=torch.float64)
    direct = {"man": torch.stack([n.mean() if n.numel() else z for n in norms.values()]),
              "msan": torch.stack([n.square().mean() if n.numel() else z for n in norms.values()])}
    cfg = {c: PruneConfig(criterion=c, keep=2) for c in ("ean", "man", "msan")}
    got = {c: expert_scores(stats, layer, cfg[c]) for c in cfg}
    torch.testing.assert_close(got["man"], got["ean"], rtol=0, atol=0)
    for c in ("man", "msan"):
        torch.testing.assert_close(got[c], direct[c], rtol=1e-5, atol=1e-7)
    assert int(got["man"].argmax()) == 3 and int(got["msan"].argmax()) == 3

    with torch.no_grad():
        layer.experts.down_proj[3] /= 4
    base = profile(model, ProfileConfig(progress=False), tokens=tokens)
    torch.testing.assert_close(expert_scores(base, layer, cfg["man"])[3] * 4, got["man"][3])
    torch.testing.assert_close(expert_scores(base, layer, cfg["msan"])[3] * 16, got["msan"][3])
    for c in ("man", "msan"):
        report = prune_(copy.deepcopy(model), PruneConfig(criterion=c, ratio=0.25, allow_super_experts=True), stats=base)
        want = plan(arch.moe_layers(model), base, PruneConfig(criterion="ean" if c == "man" else c, ratio=0.25,
                                                                 allow_super_experts=True))
        assert {r["layer"]: r["kept"] for r in report["layers"]} == want


def _run(argv, capsys):
    from moekit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_aimer_without_stats_and_msan_with(tmp_path, capsys, char_tokenizer):
    from moekit.checkpoint.load import load_model
    from moekit.checkpoint.save import save_model

    model = tiny_model("qwen3_moe")
    save_model(model, char_tokenizer, tmp_path / "m", verify=False)
    base = ["prune", str(tmp_path / "m"), "--ratio", "0.25", "--device", "cpu"]

    code, out, err = _run(base + ["--criterion", "aimer", "--out", str(tmp_path / "a")], capsys)
    assert code in (0, None), err
    assert "criterion aimer" in out and "none is protected" in err
    a, _ = load_model(str(tmp_path / "a"), with_tokenizer=False)
    assert {layer.num_experts for layer in arch.moe_layers(a)} == {6}

    code, _, err = _run(base + ["--out", str(tmp_path / "r")], capsys)  # reap, the default, needs statistics
    errors = [line for line in err.splitlines() if line.startswith("moekit: error:")]
    assert code == 2 and len(errors) == 1 and "needs expert statistics" in errors[0]
    assert not (tmp_path / "r").exists()

    profile(model, ProfileConfig(progress=False), tokens=ids(batch=2, length=8)).save(tmp_path / "s.safetensors")
    code, out, err = _run(base + ["--criterion", "msan", "--stats", str(tmp_path / "s.safetensors"),
                                  "--out", str(tmp_path / "q")], capsys)
    assert code in (0, None), err
    assert "criterion msan" in out and "none is protected" not in err
