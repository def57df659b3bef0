"""Device maps: parsing, both checkpoint forms keeping their placement, the checks on the meta model, and the
memory rows of ``moekit info``."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import ids, tiny_model

import moekit
from moekit.checkpoint.device_map import check_fits, memory_needs, parse_device_map, parse_max_memory, plan
from moekit.checkpoint.load import load_model, meta_model
from moekit.core.arch import moe_layers
from moekit.errors import MoekitError


@pytest.fixture()
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("qwen3_moe")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """The tiny model in the standard form and in moekit's own (non-uniform) form."""
    root = tmp_path_factory.mktemp("dm")
    moekit.save_model(tiny, None, root / "standard")
    pruned = tiny_model("qwen3_moe")
    moe_layers(pruned)[0].keep_experts([0, 2, 5, 7])
    moekit.save_model(pruned, None, root / "moekit")
    assert (root / "moekit" / "moekit-model.st").exists()
    return root, pruned


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def test_parse_device_map(two_gpus, tmp_path):
    assert parse_device_map(None) is None
    assert parse_device_map("balanced_low_0") == "balanced_low_0"
    assert parse_device_map("cpu") == {"": "cpu"} and parse_device_map("cuda:1") == {"": 1} and parse_device_map(0) == {"": 0}
    text = '{"model.embed_tokens": 0, "model.layers.0": "cuda:1", "": "cpu", "lm_head": "disk"}'
    assert parse_device_map(text) == {"model.embed_tokens": 0, "model.layers.0": 1, "": "cpu", "lm_head": "disk"}
    (tmp_path / "map.json").write_text(text)
    assert parse_device_map(str(tmp_path / "map.json")) == parse_device_map(text)


@pytest.mark.parametrize("text, words", [
    ("cuda:3", "does not exist"), ("5", "does not exist"), ('{"": 2}', "does not exist"), ("tpu", "unknown device"),
    ("meta", "unknown device"), ('{"": -1}', "does not exist"), ('{"model.layers.0": "cpu"', "not valid JSON"),
    ("[1, 2]", "unknown device"), ('{"": "cpu", "x": null}', "unknown device"), ("{}", "map module names"),
    ("nowhere.json", "does not exist"),
])
def test_parse_device_map_refuses(two_gpus, text, words):
    with pytest.raises(MoekitError, match=words):
        parse_device_map(text)


def test_parse_max_memory(two_gpus):
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: 20 * 2**30, "cpu": 60 * 2**30}
    assert parse_max_memory('{"cuda:1": "500MB", "cpu": 1000}') == {1: 500 * 10**6, "cpu": 1000}
    assert parse_max_memory({0: "1GiB"}) == {0: 2**30}


@pytest.mark.parametrize("text, words", [
    ("cpu", "not DEVICE=SIZE"), ("cpu=lots", "not a size"), ("2=1GiB", "does not exist"), ("tpu=1GiB", "unknown device"),
    ("", "is empty"), ('{"cpu": }', "not valid JSON"), ("[1]", "not DEVICE=SIZE"),
])
def test_parse_max_memory_refuses(two_gpus, text, words):
    with pytest.raises(MoekitError, match=words):
        parse_max_memory(text)


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto", "sequential",
                                        '{"model.embed_tokens": "cpu", "model.layers": "cpu", "": "cpu"}'])
def test_standard_form_loads_with_a_map(saved, tiny, device_map):
    model, _ = load_model(str(saved[0] / "standard"), device_map=device_map, with_tokenizer=False)
    assert torch.equal(logits(model), logits(tiny))


def test_moekit_form_keeps_its_map_and_offloads_to_disk(saved, tmp_path):
    root, pruned = saved
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model, _ = load_model(str(root / "moekit"), device_map=json.dumps(device_map), offload_folder=tmp_path / "off",
                          with_tokenizer=False)
    assert model.hf_device_map == device_map
    assert all(p.is_meta for p in model.model.layers[1].parameters())  # its weights wait on disk
    assert any((tmp_path / "off").rglob("*.dat"))
    assert [layer.num_experts for layer in moe_layers(model)] == [4, 8]
    assert torch.allclose(logits(model), logits(pruned), atol=1e-6)


def test_moekit_form_with_a_budget_spills_to_disk(saved, tmp_path):
    root, pruned = saved
    model, _ = load_model(str(root / "moekit"), max_memory="cpu=80KiB", offload_folder=tmp_path / "off",
                          with_tokenizer=False)
    assert "disk" in model.hf_device_map.values() and "cpu" in model.hf_device_map.values()
    assert torch.allclose(logits(model), logits(pruned), atol=1e-6)


def test_meta_model_reads_no_weights_and_checks_the_map(saved, tiny):
    model = meta_model(str(saved[0] / "moekit"), dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    assert [layer.num_experts for layer in moe_layers(model)] == [4, 8]
    check_fits(model, {"": "cpu"}, None, None)
    with pytest.raises(MoekitError, match="'model.nothing'"):
        check_fits(model, {"model.nothing": "cpu", "": "cpu"}, None, None)
    with pytest.raises(MoekitError, match="no device to 'lm_head.weight'"):
        check_fits(model, {"model": "cpu"}, None, None)
    with pytest.raises(MoekitError, match="--offload-folder"):
        check_fits(model, {"": "disk"}, None, None)
    with pytest.raises(MoekitError, match=r"one decoder layer needs .* at bfloat16"):
        check_fits(model, "auto", {"cpu": 1024}, None)
    check_fits(model, "auto", {"cpu": 1024}, "folder")  # layers may wait on disk


def test_memory_rows_add_up():
    from transformers import AutoModelForCausalLM

    from moekit.checkpoint.read import empty_model

    deep = empty_model(tiny_model("qwen3_moe", num_hidden_layers=12).config).to(torch.bfloat16)
    need = memory_needs(deep)
    real = AutoModelForCausalLM.from_config(deep.config, dtype=torch.bfloat16)
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    assert need["load"] == size(real.parameters()) + size(deep.buffers())  # rotary frequencies: fp32 in real
    assert need["load"] < need["load_and_save"] < 1.5 * need["load"] and need["sequential"] < need["load"] / 2
    by_device = plan(deep, "auto", {"cpu": need["load"] // 3})
    assert set(by_device) == {"cpu", "disk"} and sum(by_device.values()) == need["load"]


def test_info_prints_the_memory_rows_without_loading(saved, cli, monkeypatch, tmp_path):
    import moekit.checkpoint.load as load

    monkeypatch.setattr(load, "read_dir", lambda *a, **k: pytest.fail("info read the weights"))
    code, out, err = cli("info", saved[0] / "moekit", "--json", "--max-memory", "cpu=80KiB", "--offload-folder", tmp_path / "off")
    assert code == 0, err
    memory = json.loads(out)["memory"]
    assert memory["dtype"] == "float32" and memory["load"] < memory["load_and_save"] < 2 * memory["load"]
    assert sum(memory["device_map"].values()) == memory["load"] and memory["device_map"]["disk"] > 0
    code, out, _ = cli("info", saved[0] / "standard")
    assert code == 0 and "layer-sequential" in out and "KiB" in out
