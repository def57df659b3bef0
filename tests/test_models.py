"""Loading: local safetensors directories, refusals, GGUF, the embedded default."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA, needs_data, needs_smollm2
from tiny import tiny_model

from moekit import describe, load_model, save_model
from moekit.errors import MoekitError
from moekit.profile.stats import fingerprint


def test_load_local_directory_round_trip(tmp_path, char_tokenizer):
    model = tiny_model("qwen2_moe")
    save_model(model, None, tmp_path / "m", verify=False)
    char_tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"), device="cpu")
    assert tok is not None and loaded.dtype == torch.float32
    assert fingerprint(loaded) == fingerprint(model)


def test_pickle_checkpoint_refused(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MoekitError, match="pickle"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.mkdir(), p)[1], "is empty"),
    (lambda p: (p.mkdir(), (p / "x.txt").write_text("x"), p)[2], "no config.json"),
])
def test_bad_model_paths(tmp_path, make, message):
    with pytest.raises(MoekitError, match=message):
        load_model(str(make(tmp_path / "model")))


def test_empty_name_and_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(MoekitError, match="no model given"):
        load_model("")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "g")
    with pytest.raises(MoekitError, match="unsupported architecture 'gpt2'.*MoE families and the dense"):
        load_model(str(tmp_path / "g"))


def test_remote_code_is_off_by_default(tmp_path):
    model = tiny_model("llama")
    save_model(model, None, tmp_path / "m", verify=False)
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"model_type": "llama"', '"model_type": "custom_thing", "auto_map": {"AutoConfig": "x.Y"}'))
    with pytest.raises((MoekitError, ValueError)):
        load_model(str(tmp_path / "m"))


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_offline_as_plain_llama(smollm2):
    model, tok = smollm2
    d = describe(model)
    assert d["model_type"] == "llama" and d["moe_layers"] == 0 and d["layers"] == 30
    assert 134e6 < d["params_total"] < 136e6
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.slow
@needs_smollm2
@needs_data
def test_smollm2_perplexity_is_that_of_a_135m_model(smollm2):
    """Reference (../shared/data/README.md): about 27 over the first 16,384 tokens, 1024-token windows."""
    from moekit.eval.perplexity import perplexity, windows

    model, tok = smollm2
    toks = windows(tok, str(DATA / "dev" / "c4_valid_dev.jsonl"), max_tokens=16384, window=1024)
    assert toks.shape == (16, 1024)
    ppl = perplexity(model, toks, batch_size=4, progress=False)
    assert 24 < ppl < 30, ppl
