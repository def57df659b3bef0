"""`moekit quantize`: a moekit output through llm-compressor (its own environment) into a checkpoint vLLM serves.

The refusals run everywhere; the chain (prune -> quantize -> perplexity in vLLM) needs both client environments
and is marked vllm/slow (CI creates the environments first)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import DATA, needs_data

from moekit.core.keys import PER_LAYER_EXPERTS_KEY
from moekit.errors import MoekitError


def test_config_validates_and_keeps_routers_unquantized():
    from moekit.serve.quantize import QuantizeConfig

    with pytest.raises(MoekitError, match="scheme 'INT3'"):
        QuantizeConfig(scheme="INT3").validate()
    ignore = QuantizeConfig(experts=False).ignore()
    assert "lm_head" in ignore
    # the patterns, read as llm-compressor reads "re:" entries, catch the routers and experts of real module names
    pats = [re.compile(p[3:]) for p in ignore if p.startswith("re:")]
    def ignored(name):
        return any(p.match(name) for p in pats)
    assert ignored("model.layers.3.mlp.gate") and ignored("model.layers.3.mlp.shared_expert_gate")
    assert ignored("model.layers.3.block_sparse_moe.gate") and ignored("model.layers.3.mlp.experts.7.up_proj")
    assert not ignored("model.layers.3.mlp.shared_expert.gate_proj") and not ignored("model.layers.3.self_attn.q_proj")
    assert not any(p.match("model.layers.3.mlp.experts.7.up_proj") for p in
                   (re.compile(x[3:]) for x in QuantizeConfig(experts=True).ignore() if x.startswith("re:")))


def test_missing_environment_is_one_line(tmp_path, monkeypatch):
    from moekit.serve.quantize import find_llmc_python

    monkeypatch.delenv("MOEKIT_LLMC_PYTHON", raising=False)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    with pytest.raises(MoekitError, match="moekit llmc-env"):
        find_llmc_python()
    with pytest.raises(MoekitError, match="--llmc-python"):
        find_llmc_python(tmp_path / "nothing")


def test_quantize_refuses_forms_it_would_misread_before_any_work(tmp_path, cli):
    from safetensors.torch import save_file
    import torch

    moekit_form = tmp_path / "moekit-form"
    moekit_form.mkdir()
    (moekit_form / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", PER_LAYER_EXPERTS_KEY: [4, 2]}))
    code, _, err = cli("quantize", moekit_form, "--out", tmp_path / "q")
    assert code == 2 and "moekit uniform" in err and not (tmp_path / "q").exists()

    done = tmp_path / "already"
    done.mkdir()
    (done / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "quantization_config": {"format": "int-quantized"}}))
    save_file({"x": torch.zeros(1)}, str(done / "model.safetensors"))
    code, _, err = cli("quantize", done, "--out", tmp_path / "q")
    assert code == 2 and "already quantized" in err

    code, _, err = cli("quantize", done, "--out", tmp_path / "q", "--scheme", "INT3")
    assert code == 2 and "INT3" in err and "Traceback" not in err


@pytest.mark.vllm
@pytest.mark.slow
@needs_data
def test_prune_then_quantize_serves_in_vllm_with_perplexity_close_to_unquantized(served_forms, llmc_python, vllm_python,
                                                                                 tmp_path, cli):
    """The chain of the issue: a moekit-pruned checkpoint, W8A8 by llm-compressor, perplexity measured in vLLM."""
    from safetensors import safe_open

    from moekit.checkpoint.load import load_model
    from moekit.eval.perplexity import perplexity, windows

    pruned = served_forms["pruned-uniform (reap -25%, uniform budget)"]
    out = tmp_path / "w8a8"
    code, printed, err = cli("quantize", pruned, "--no-experts", "--out", out, "--llmc-python", llmc_python)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "I8"
    assert all(d != "I8" for k, d in dtypes.items() if ".experts." in k or k.endswith("mlp.gate.weight"))
    assert oct((out / "config.json").stat().st_mode & 0o777) != "0o600"  # the user's umask, not mkdtemp's

    data = DATA / "dev" / "c4_valid_dev.jsonl"
    code, printed, err = cli("ppl", out, "--backend", "vllm", "--data", data, "--max-tokens", "4096",
                             "--vllm-python", vllm_python)
    assert code == 0, err
    quantized = float(printed.split()[1])
    model, tok = load_model(str(pruned))
    reference = perplexity(model, windows(tok, str(data), max_tokens=4096), progress=False)
    # int8 on the attention and shared-expert projections costs little: within 10% of the float checkpoint
    assert abs(quantized / reference - 1) < 0.10, (quantized, reference)
