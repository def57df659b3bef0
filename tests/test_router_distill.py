"""Router distillation: only routers (and the folded scales) change, the held-out KL falls, the result is a standard
checkpoint, resume equals an uninterrupted run, the scale folds back exactly; the recipe step and the command."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import ids, tiny_model

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.profile.profile import ProfileConfig, profile
from moekit.prune.prune import PruneConfig, prune_
from moekit.train.distill import latest_checkpoint
from moekit.train.router import RouterDistillConfig, distill_router_, fold_scales, scale_hook

FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3"]  # plain; router and expert biases; selection bias + dense layer


def pruned(family: str = "qwen3_moe", **over):
    """(the original tiny model, a copy pruned to half its experts by REAP)."""
    teacher = tiny_model(family, **over)
    stats = profile(teacher, ProfileConfig(progress=False), tokens=ids(batch=4, length=16, seed=3))
    student = copy.deepcopy(teacher)
    prune_(student, PruneConfig(criterion="reap", ratio=0.5), stats=stats)
    return teacher, student


def data(n: int = 116):
    """Random token sequences: with fewer the routers learn the training rows and the held-out KL does not fall."""
    return torch.randint(3, 96, (n, 16), generator=torch.Generator().manual_seed(5))


def cfg(**kw):
    return RouterDistillConfig(**{"steps": 40, "lr": 1e-2, "batch_size": 8, "seq_len": 16, "heldout": 16,
                                  "progress": False, **kw})


def kinds(model) -> dict[str, tuple[str, int]]:
    """State-dict name -> ("router" | "down", layer) for the tensors router distillation may change."""
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for layer in arch.moe_layers(model):
        r, e = names[layer.router_linear], names[layer.experts]
        out.update({f"{r}.weight": ("router", layer.index), f"{r}.bias": ("router", layer.index),
                    f"{e}.down_proj": ("down", layer.index), f"{e}.down_proj_bias": ("down", layer.index)})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_only_routers_and_scales_change_and_the_heldout_kl_falls(family):
    teacher, student = pruned(family)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rep = distill_router_(student, cfg(), tokens=data(), teacher=teacher)
    assert rep["steps_run"] == 40 and rep["tokens_run"] == 40 * 8 * 16 and rep["heldout_tokens"] == 16 * 16
    assert rep["kl_heldout_after"] < 0.95 * rep["kl_heldout_before"], rep
    kind = kinds(student)
    changed_routers = 0
    for name, after in student.state_dict().items():
        what, layer = kind.get(name, ("frozen", None))
        if what == "router":
            changed_routers += not torch.equal(after, before[name])
        elif what == "down":  # the trained scale, folded after every step: the old tensor times their product
            assert rep["scales"][layer] != 1.0
            torch.testing.assert_close(after, before[name] * rep["scales"][layer], rtol=1e-5, atol=0, msg=name)
        else:
            assert torch.equal(after, before[name]), name
    assert changed_routers == len(arch.moe_layers(student)) * (2 if family == "gpt_oss" else 1)
    assert all(p.requires_grad for p in student.parameters())  # the caller's flags are back


def test_without_scale_the_experts_stay_bit_identical():
    teacher, student = pruned()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rep = distill_router_(student, cfg(steps=3, train_scale=False), tokens=data(), teacher=teacher)
    assert rep["scales"] == {}
    kind = kinds(student)
    for name, after in student.state_dict().items():
        if kind.get(name, ("frozen",))[0] != "router":
            assert torch.equal(after, before[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_with_experts_the_moe_blocks_train_whole_and_nothing_else(family):
    teacher, student = pruned(family)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rep = distill_router_(student, cfg(lr=3e-3, train_experts=True), tokens=data(), teacher=teacher)
    assert rep["scales"] == {}  # the down projections learn the scale themselves
    assert rep["kl_heldout_after"] < 0.95 * rep["kl_heldout_before"], rep
    names = {m: n for n, m in student.named_modules()}
    blocks = tuple(names[layer.block] + "." for layer in arch.moe_layers(student))
    trained = {n for n, p in student.named_parameters() if n.startswith(blocks)}
    assert rep["trained_parameters"] == sum(p.numel() for n, p in student.named_parameters() if n in trained)
    changed = {n for n, after in student.state_dict().items() if not torch.equal(after, before[n])}
    assert changed and changed <= trained  # attention, norms, embeddings and dense layers are frozen
    assert any(".experts." in n and "down_proj" in n for n in changed) and any(".experts." in n and "gate_up" in n
                                                                              for n in changed)


def test_a_token_budget_sets_the_steps():
    teacher, student = pruned()
    rep = distill_router_(student, cfg(max_tokens=3 * 8 * 16 + 5, heldout=2), tokens=data(), teacher=teacher)
    assert rep["steps_run"] == 3 and rep["tokens_run"] == 3 * 8 * 16 and rep["heldout_tokens"] == 2 * 16


def test_the_result_is_a_standard_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from moekit.checkpoint.save import save_model

    teacher, student = pruned()
    distill_router_(student, cfg(steps=4), tokens=data(), teacher=teacher)
    save_model(student, None, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = ids(batch=2, length=16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, student(x).logits, atol=0, rtol=0)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    teacher, original = pruned()
    straight = copy.deepcopy(original)
    full = distill_router_(straight, cfg(steps=6), tokens=data(), teacher=teacher)

    class Killed(Exception):
        pass

    def kill_at_3(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        distill_router_(copy.deepcopy(original), cfg(steps=6, out=str(tmp_path), checkpoint_every=2), tokens=data(),
                        teacher=teacher, callback=kill_at_3)
    assert latest_checkpoint(tmp_path).name == "checkpoint-000002"
    resumed = copy.deepcopy(original)  # the pruned student as given: resume loads the routers and the scales
    rep = distill_router_(resumed, cfg(steps=6, out=str(tmp_path), checkpoint_every=2, resume=True), tokens=data(),
                          teacher=teacher)
    assert rep["start_step"] == 2 and rep["steps_run"] == 4
    assert rep["losses"] == full["losses"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "longcat_flash"])  # LongCat: zero (identity) experts
def test_the_scale_folds_back_exactly(family):
    """Training with the scale hook and folding the scale into the down projections give the same model."""
    _, student = pruned(family)
    layers = arch.moe_layers(student)
    scales = {layer.index: torch.tensor(1.3 - 0.6 * i) for i, layer in enumerate(layers)}
    x = ids(batch=2, length=16, seed=9)
    with torch.no_grad(), Hooks() as hooks:
        for layer in layers:
            hooks.forward(layer.experts, scale_hook(layer, scales[layer.index]))
        hooked = student(x).logits
    plain = student(x).logits
    assert fold_scales(layers, scales) == pytest.approx({layers[0].index: 1.3, layers[1].index: 0.7})
    assert all(float(s) == 1.0 for s in scales.values())  # folded, so set back to 1
    with torch.no_grad():
        folded = student(x).logits
    assert not torch.allclose(plain, hooked, atol=1e-3)
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-5)


def test_the_recipe_step_learns_from_the_recipe_model(tmp_path, char_tokenizer, monkeypatch):
    from moekit.checkpoint.save import save_model
    from moekit.pipeline.recipe import load_recipe
    from moekit.pipeline.runner import run_recipe

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    save_model(tiny_model("qwen3_moe", vocab_size=len(char_tokenizer)), char_tokenizer, tmp_path / "model")
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog. " * 2 for i in range(20)]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "r.yaml").write_text(f"""\
model: {tmp_path / 'model'}
data: {{calib: {tmp_path / 'calib.jsonl'}, calib_seqs: 6, calib_seq_len: 32}}
steps:
  - profile: {{}}
  - prune: {{criterion: reap, ratio: 0.5}}
  - distill_router: {{steps: 3, batch_size: 2, seq_len: 32, heldout: 2}}
""")
    results = run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "run", progress=False)
    rep = results[-1]["report"]
    assert rep["steps_run"] == 3 and rep["heldout_tokens"] == 64 and rep["kl_heldout_before"] > 0
    assert (tmp_path / "run" / "03-distill_router" / "model" / "config.json").exists()


def test_the_command_writes_the_model_and_a_report_and_resumes(tmp_path, char_tokenizer, cli):
    from moekit.checkpoint.save import save_model

    teacher, student = pruned(vocab_size=len(char_tokenizer))
    save_model(teacher, char_tokenizer, tmp_path / "teacher")
    save_model(student, char_tokenizer, tmp_path / "student")
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["distill-router", tmp_path / "student", "--teacher", tmp_path / "teacher", "--data", tmp_path / "text.txt",
            "--out", tmp_path / "o", "--batch-size", 2, "--seq-len", 16, "--heldout", 1, "--checkpoint-every", 1]
    code, out, err = cli(*args, "--steps", 2)
    assert code == 0, err
    assert "held-out KL" in out and (tmp_path / "o" / "final" / "config.json").exists()
    code, _, err = cli(*args, "--tokens", 4 * 2 * 16, "--resume")
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "router_distill_report.json").read_text())
    assert rep["start_step"] == 2 and rep["steps_run"] == 2 and len(rep["losses"]) == 4
