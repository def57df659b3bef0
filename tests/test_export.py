"""Atomic, verified saving."""

from __future__ import annotations

import pytest
import torch
from tiny import ids, tiny_model

import moekit
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

    def corrupting_write(m, tok, path):
        real_write(m, tok, path)
        from safetensors.torch import load_file, save_file

        f = path / "model.safetensors"
        state = load_file(f)
        key = next(k for k in state if "experts.0.down_proj" in k)
        state[key] = state[key] + 1.0
        save_file(state, f, metadata={"format": "pt"})

    monkeypatch.setattr(export, "_write", corrupting_write)
    with pytest.raises(MoekitError, match="logits differ"):
        moekit.save_model(model, None, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_tokenizer_and_generation_config_are_written(tmp_path, char_tokenizer):
    out = moekit.save_model(tiny_model("mixtral"), char_tokenizer, tmp_path / "m")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= names
