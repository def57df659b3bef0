"""Distillation: the loss falls, checkpoints are complete and resume continues exactly."""

from __future__ import annotations

import pytest
import torch

from moekit.densify.densify import DensifyConfig, densify
from moekit.train.distill import DistillConfig, distill_, forward_kl, latest_checkpoint
from moekit.errors import MoekitError
from test_densify import local_stats
from tiny import ids, tiny_model


def pair():
    teacher = tiny_model("qwen3_moe")
    student = densify(teacher, DensifyConfig(keep=2, score="acp"), stats=local_stats(teacher, ids()))
    return student, teacher


def data():
    return torch.randint(3, 96, (16, 16), generator=torch.Generator().manual_seed(3))


def test_forward_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert forward_kl(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl(a, torch.randn(2, 5, 11)).item() > 0.01


def test_distill_loss_decreases():
    student, teacher = pair()
    cfg = DistillConfig(steps=30, lr=3e-3, batch_size=4, seq_len=16, warmup_steps=2, progress=False)
    rep = distill_(student, cfg, tokens=data(), teacher=teacher)
    assert rep["steps_run"] == 30 and rep["tokens_run"] == 30 * 4 * 16
    first, last = sum(rep["losses"][:3]) / 3, sum(rep["losses"][-3:]) / 3
    assert last < 0.7 * first
    # the teacher did not move
    ref = tiny_model("qwen3_moe")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), teacher.state_dict().values(), strict=False))


def test_checkpoint_resume_continues_exactly(tmp_path):
    cfg = {"steps": 6, "lr": 2e-3, "batch_size": 2, "seq_len": 16, "warmup_steps": 1, "progress": False}
    straight, teacher = pair()
    full = distill_(straight, DistillConfig(**cfg), tokens=data(), teacher=teacher)

    interrupted, teacher = pair()
    distill_(interrupted, DistillConfig(**cfg, out=str(tmp_path), checkpoint_every=3), tokens=data(), teacher=teacher)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-000006"
    # pretend the run died after step 3: remove the last checkpoint
    import shutil

    shutil.rmtree(ckpt)
    assert latest_checkpoint(tmp_path).name == "checkpoint-000003"
    resumed, teacher = pair()  # a fresh student: resume must load the checkpoint's weights
    rep = distill_(resumed, DistillConfig(**cfg, out=str(tmp_path), resume=True), tokens=data(), teacher=teacher)
    assert rep["start_step"] == 3 and rep["steps_run"] == 3
    assert rep["losses"] == pytest.approx(full["losses"], rel=1e-4, abs=1e-6)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=False):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    # no temporary directories left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_distill_from_text_streams_and_needs_a_tokenizer(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"document {i} " + "word " * 20 for i in range(5)))
    student, teacher = pair()
    with pytest.raises(MoekitError, match="tokenizer"):
        distill_(student, DistillConfig(steps=1, progress=False), tokens=str(f), teacher=teacher)

    class Tok:  # minimal tokenizer: one id per character
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + ord(c) % 90 for c in text]}

    rep = distill_(student, DistillConfig(steps=2, batch_size=2, seq_len=8, progress=False), tokens=str(f), teacher=teacher, tokenizer=Tok())
    assert rep["steps_run"] == 2


def test_resume_without_checkpoint_is_refused(tmp_path):
    student, teacher = pair()
    with pytest.raises(MoekitError, match="no complete checkpoint"):
        distill_(student, DistillConfig(steps=2, out=str(tmp_path / "none"), resume=True, progress=False), tokens=data(), teacher=teacher)


def test_recipe_profile_densify_distill(tmp_path, char_tokenizer):
    """The recipe runner drives densify and distill through their config dataclasses."""
    import json

    from moekit.checkpoint.save import save_model
    from moekit.pipeline.recipe import load_recipe
    from moekit.pipeline.runner import run_recipe

    save_model(tiny_model("qwen3_moe", vocab_size=100, max_position_embeddings=1024), char_tokenizer,
               tmp_path / "moe", verify=False)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"text {i} " + "abc def ghi " * 30}) for i in range(6)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""model: {tmp_path / 'moe'}
data:
  calib: {calib}
device: cpu
steps:
  - profile: {{gram_tokens: 64, progress: false}}
  - densify: {{keep: 3, score: do-acp}}
  - distill: {{steps: 2, batch_size: 2, seq_len: 16, progress: false}}
""")
    results = run_recipe(load_recipe(recipe), tmp_path / "run", progress=False)
    assert [r["step"] for r in results] == ["profile", "densify", "distill"]
    assert results[2]["report"]["steps_run"] == 2
    cfg = json.loads((tmp_path / "run" / "03-distill" / "model" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["moekit_densified"]["score"] == "do-acp"
