"""Saving in shards, one decoder layer at a time, verified tensor by tensor; the logits check only when memory allows."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny import ids, tiny_model

import moekit
from moekit.checkpoint import save as export
from moekit.core.arch import moe_layers
from moekit.errors import MoekitError

SMALL = 30_000  # bytes: a tiny model's layer is about 50 kB, so every layer starts a shard


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits


def test_standard_form_in_shards_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3_moe")
    out = moekit.save_model(model, None, tmp_path / "m", max_shard_bytes=SMALL)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in index["weight_map"]  # transformers' on-disk names
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(logits(model), logits(reloaded.eval()))


def test_non_uniform_form_in_shards_reloads_and_no_engine_picks_it_up(tmp_path):
    from moekit.checkpoint.forms import checkpoint_form

    model = tiny_model("qwen3_moe", tie_word_embeddings=True)
    model.tie_weights()
    moe_layers(model)[0].keep_experts([0, 2, 5])
    moe_layers(model)[1].set_top_k(1)
    out = moekit.save_model(model, None, tmp_path / "m", max_shard_bytes=SMALL)
    names = sorted(p.name for p in out.iterdir())
    shards = sorted(set(json.loads((out / "moekit-model.st.index.json").read_text())["weight_map"].values()))
    assert len(shards) >= 2 and shards == [n for n in names if n.endswith(".st")]
    assert shards[0] == f"moekit-model-00001-of-{len(shards):05d}.st"
    assert not any(n.endswith(".safetensors") for n in names)
    assert checkpoint_form(out).name == "moekit"
    back, _ = moekit.load_model(str(out), with_tokenizer=False, device="cpu")
    assert [layer.num_experts for layer in moe_layers(back)] == [3, 8]
    assert [layer.top_k for layer in moe_layers(back)] == [2, 1]
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model), logits(back))


def test_per_expert_tensors_are_made_one_layer_at_a_time(tmp_path, monkeypatch):
    import transformers.core_model_loading as cml

    seen, real = [], cml.revert_weight_conversion
    monkeypatch.setattr(cml, "revert_weight_conversion", lambda m, sd: seen.append(set(sd)) or real(m, sd))
    moekit.save_model(tiny_model("qwen3_moe"), None, tmp_path / "m")
    layers = [{k.split(".")[2] for k in keys if k.startswith("model.layers.")} for keys in seen]
    assert seen and all(len(s) <= 1 for s in layers)


def _flip_last_byte(monkeypatch):
    from moekit.checkpoint import shard_writer

    real = shard_writer.write_part

    def corrupting(path, tensors, metadata):
        real(path, tensors, metadata)
        with open(path, "r+b") as f:
            f.seek(-1, 2)
            byte = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([byte[0] ^ 1]))

    monkeypatch.setattr(shard_writer, "write_part", corrupting)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("uniform", [True, False])
def test_a_corrupted_write_is_caught_and_nothing_is_left(tmp_path, monkeypatch, verify, uniform):
    model = tiny_model("qwen3_moe")
    if not uniform:
        moe_layers(model)[0].keep_experts([0, 1, 2])
    _flip_last_byte(monkeypatch)
    # verify=True: the finished shards are read back; verify=False: the writer still checks each part it writes
    match = "differs from the in-memory model" if verify else "differs from what was written"
    with pytest.raises(MoekitError, match=match):
        moekit.save_model(model, None, tmp_path / "m", verify=verify, max_shard_bytes=SMALL)
    assert not list(tmp_path.iterdir())


def test_a_config_that_does_not_describe_the_weights_is_caught(tmp_path, monkeypatch):
    from moekit.core import arch
    from moekit.core.keys import PER_LAYER_EXPERTS_KEY

    model = tiny_model("qwen3_moe")
    moe_layers(model)[0].keep_experts([0, 1, 2])
    monkeypatch.setattr(arch, "sync_config", lambda m: None)
    delattr(model.config, PER_LAYER_EXPERTS_KEY)  # the saved config does not say layer 0 holds 3 experts
    with pytest.raises(MoekitError, match="does not reload cleanly.*mismatched_keys.*layers.0"):
        moekit.save_model(model, None, tmp_path / "m")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("uniform", [True, False])
def test_the_logits_check_runs_only_when_the_model_fits_twice(tmp_path, monkeypatch, caplog, uniform):
    import transformers

    model = tiny_model("qwen3_moe")
    if not uniform:
        moe_layers(model)[0].keep_experts([0, 1, 2])
    size = sum(p.nbytes for p in model.parameters())
    reloads = []
    real_read_dir = export.read_dir
    monkeypatch.setattr(export, "read_dir", lambda *a, **k: reloads.append(a) or real_read_dir(*a, **k))

    monkeypatch.setattr(export, "available_memory", lambda device: 10 * size)
    moekit.save_model(model, None, tmp_path / "fits")
    assert len(reloads) == 1 and "skipped" not in caplog.text

    def refuse(*a, **k):
        raise AssertionError("a second copy of the model was loaded")

    monkeypatch.setattr(export, "available_memory", lambda device: size)
    monkeypatch.setattr(export, "read_dir", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with caplog.at_level(logging.WARNING, logger="moekit"):
        out = moekit.save_model(model, None, tmp_path / "short")
    notes = [r.getMessage() for r in caplog.records if r.name == "moekit"]
    assert len(notes) == 1 and "\n" not in notes[0] and "skipped reloading it to compare logits" in notes[0]
    monkeypatch.undo()
    back, _ = moekit.load_model(str(out), with_tokenizer=False, device="cpu")
    assert torch.equal(logits(model), logits(back))


def test_the_logits_check_still_catches_a_reload_that_differs(tmp_path, monkeypatch):
    model = tiny_model("qwen3_moe")
    real_read_dir = export.read_dir

    def off(*a, **k):
        m, tok = real_read_dir(*a, **k)
        with torch.no_grad():
            m.lm_head.weight.add_(1.0)
        return m, tok

    monkeypatch.setattr(export, "read_dir", off)
    with pytest.raises(MoekitError, match="logits differ"):
        moekit.save_model(model, None, tmp_path / "m")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("uniform", [True, False])
def test_a_model_with_layers_offloaded_to_disk_saves(tmp_path, uniform):
    from accelerate import dispatch_model

    model = tiny_model("qwen3_moe")
    if not uniform:
        moe_layers(model)[0].keep_experts([0, 1, 2])
    want = logits(model)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "off"))
    assert all(p.is_meta for p in model.model.layers[1].parameters())
    moekit.save_model(model, None, tmp_path / "m", max_shard_bytes=SMALL)
    back, _ = moekit.load_model(str(tmp_path / "m"), with_tokenizer=False, device="cpu")
    assert torch.equal(logits(back), want)
