"""Atomic, verified saving."""

from __future__ import annotations

import pytest
import torch
from tiny import ids, tiny_model

import moekit
from moekit import outputs
from moekit.checkpoint import save as export
from moekit.errors import MoekitError


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(MoekitError, match="already exists.*--overwrite"):
        moekit.save_model(tiny_model("qwen3_moe"), None, out)
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "m"
    moekit.save_model(tiny_model("qwen3_moe", seed=0), None, out)
    model = tiny_model("qwen3_moe", seed=1)
    moekit.save_model(model, None, out, overwrite=True)
    reloaded, _ = moekit.load_model(str(out), with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(reloaded(ids()).logits, model(ids()).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_verification_keeps_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "m"
    moekit.save_model(tiny_model("qwen3_moe", seed=0), None, out)
    before = {p.name: p.stat().st_size for p in out.iterdir()}

    def broken(*a, **k):
        raise MoekitError("simulated verification failure")

    monkeypatch.setattr(export, "verify_checkpoint", broken)
    with pytest.raises(MoekitError, match="simulated"):
        moekit.save_model(tiny_model("qwen3_moe", seed=1), None, out, overwrite=True)
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_verification_catches_a_checkpoint_that_differs(tmp_path, monkeypatch):
    model = tiny_model("qwen3_moe")
    real_write = export._write

    def corrupting_write(m, tok, path, *args, **kwargs):
        real_write(m, tok, path, *args, **kwargs)
        from safetensors.torch import load_file, save_file

        f = path / "model.safetensors"
        state = load_file(f)
        key = next(k for k in state if "experts.0.down_proj" in k)
        state[key] = state[key] + 1.0
        save_file(state, f, metadata={"format": "pt"})

    monkeypatch.setattr(export, "_write", corrupting_write)
    with pytest.raises(MoekitError, match="experts.0.down_proj.* differs from the in-memory model"):
        moekit.save_model(model, None, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_tokenizer_and_generation_config_are_written(tmp_path, char_tokenizer):
    out = moekit.save_model(tiny_model("mixtral"), char_tokenizer, tmp_path / "m")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= names


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_non_uniform_form_with_tied_embeddings_saves_and_reloads(tmp_path, family):
    """A global pruning budget on a model with tied embeddings (smollm2-moe) used to lose the embedding table."""
    from moekit.core import arch
    from moekit.core.keys import PER_LAYER_EXPERTS_KEY

    model = tiny_model(family, tie_word_embeddings=True)
    model.tie_weights()
    arch.moe_layers(model)[0].keep_experts([0, 1])
    arch.sync_config(model)
    assert getattr(model.config, PER_LAYER_EXPERTS_KEY)
    out = moekit.save_model(model, None, tmp_path / "m")
    assert (out / "moekit-model.st").exists() and not (out / "model.safetensors").exists()
    back, _ = moekit.load_model(str(out), with_tokenizer=False, device="cpu")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    x = ids(back.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, back(x).logits, atol=1e-5)


def test_a_verification_failure_names_the_target_not_the_temporary(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise MoekitError(f"something is off in {a[2]}")

    monkeypatch.setattr(export, "verify_checkpoint", broken)
    with pytest.raises(MoekitError) as e:
        moekit.save_model(tiny_model("qwen3_moe"), None, tmp_path / "m")
    assert str(tmp_path / "m") in str(e.value) and ".tmp-" not in str(e.value) and "nothing was changed" in str(e.value)
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


def test_a_killed_save_is_cleaned_on_the_next_run_and_a_live_one_is_not(tmp_path, capsys):
    import os
    import subprocess

    dead = tmp_path / ".m.tmp-dead1234"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 4096)
    proc = subprocess.Popen(["sleep", "30"])
    live = tmp_path / ".m.tmp-live1234"
    live.mkdir()
    (live / outputs.WRITER_FILE).write_text(str(proc.pid))
    try:
        moekit.save_model(tiny_model("qwen3_moe"), None, tmp_path / "m")
    finally:
        proc.kill()
    assert not dead.exists() and live.exists()
    assert ".m.tmp-dead1234" in capsys.readouterr().err
    assert not (tmp_path / "m" / outputs.WRITER_FILE).exists()
    assert os.getpid() > 0


def test_outputs_follow_the_umask_not_mkdtemp(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = moekit.save_model(tiny_model("qwen3_moe"), None, tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in out.iterdir())
