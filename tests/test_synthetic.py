"""moekit/checkpoint/synthetic.py: random-weight checkpoints in transformers' on-disk form, bf16 and FP8."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from moekit.checkpoint.safetensors_io import CheckpointReader, read_header
from moekit.checkpoint.synthetic import QWEN3_30B_A3B, main, write_synthetic
from moekit.errors import MoekitError

# Qwen3-30B-A3B's config made tiny; q_proj [192, 160] spans 2x2 FP8 blocks, neither side a multiple of 128
TINY = {**QWEN3_30B_A3B, "hidden_size": 160, "moe_intermediate_size": 48, "num_experts": 8, "num_experts_per_tok": 2,
        "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 512,
        "bos_token_id": 0, "eos_token_id": 1}


def shapes(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update({k: (info.dtype, info.shape) for k, info in read_header(f)[0].items()})
    return out


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("s") / "bf16", TINY, num_layers=2, max_shard_bytes=400_000,
                           progress=False)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("s") / "fp8", TINY, num_layers=2, fp8=True, progress=False)


def test_the_form_save_pretrained_writes(bf16, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in TINY.items() if k != "model_type"} | {"num_hidden_layers": 2}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **cfg)).to(torch.bfloat16).save_pretrained(tmp_path)
    assert shapes(bf16) == shapes(tmp_path)
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in shapes(bf16)
    assert json.loads((bf16 / "config.json").read_text())["num_hidden_layers"] == 2

    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    files = sorted(f.name for f in bf16.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == files
    for f in files:
        with safe_open(str(bf16 / f), "pt") as st:  # the safetensors library reads every shard
            assert {k for k, v in index["weight_map"].items() if v == f} == set(st.keys())
        assert (bf16 / f).stat().st_size < 400_000 + 10_000  # data within max_shard_bytes, plus the header
    assert index["metadata"]["total_size"] == sum(
        info.end - info.begin for f in files for info in read_header(bf16 / f)[0].values())


def test_transformers_loads_it_and_runs_it(bf16):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(bf16, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    w = model.model.layers[0].mlp.experts.down_proj
    assert 0.015 < w.float().std() < 0.025 and torch.equal(model.model.norm.weight, torch.ones(160, dtype=torch.bfloat16))
    logits = model(torch.tensor([[2, 3, 4, 5]])).logits
    assert torch.isfinite(logits).all() and 0 < logits.float().std() < 10


def test_fp8_is_the_same_weights_quantized(bf16, fp8):
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128], "modules_to_not_convert": [
                                                 "lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]}
    stored = shapes(fp8)
    assert stored["model.layers.0.self_attn.q_proj.weight"] == ("F8_E4M3", [192, 160])
    assert stored["model.layers.0.self_attn.q_proj.weight_scale_inv"] == ("F32", [2, 2])
    assert stored["model.layers.1.mlp.experts.3.down_proj.weight"] == ("F8_E4M3", [160, 48])
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert stored[name][0] == "BF16" and name + "_scale_inv" not in stored

    a, b = CheckpointReader(fp8), CheckpointReader(bf16)
    assert a.is_fp8 and a.stored_dtypes == {"F8_E4M3", "BF16"} and not b.is_fp8
    for layer in (0, 1):
        got, want = a.read(f"model.layers.{layer}."), b.read(f"model.layers.{layer}.", torch.float32)
        assert set(got) == set(want)
        for k, w in want.items():  # within half an e4m3 step at the top of the range (16 of 448), float32 rounding
            assert (got[k] - w).abs().max() <= w.abs().max() * 16 / 448 * (1 + 1e-4), k
    assert torch.equal(a.tensor("model.embed_tokens.weight"), b.tensor("model.embed_tokens.weight"))


def test_transformers_reads_the_fp8_form(tmp_path):
    # transformers' dequantizer takes the block as shape / scale grid, which is DeepSeek's ceil-division blocks only
    # when the sides are multiples of 128 (as in every real FP8 release): check it on such shapes
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    config = {**TINY, "hidden_size": 128, "moe_intermediate_size": 128, "num_experts": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64}
    out = write_synthetic(tmp_path / "fp8", config, num_layers=1, fp8=True, progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                       quantization_config=FineGrainedFP8Config(dequantize=True))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reader = CheckpointReader(out)
    experts = model.model.layers[0].mlp.experts
    for mine, theirs in [("self_attn.q_proj.weight", model.model.layers[0].self_attn.q_proj.weight),
                         ("self_attn.k_proj.weight", model.model.layers[0].self_attn.k_proj.weight),
                         ("mlp.experts.2.up_proj.weight", experts.gate_up_proj[2, 128:]),
                         ("mlp.experts.3.down_proj.weight", experts.down_proj[3])]:
        want = reader.tensor(f"model.layers.0.{mine}")  # theirs is dequantized in bf16: one bf16 rounding apart
        assert ((theirs.float() - want).abs() <= want.abs() * 2**-8).all(), mine


def test_the_module_entry_and_the_tokenizer(tmp_path, char_tokenizer):
    char_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    main([str(tmp_path / "out"), "--layers", "1", "--config", str(tmp_path / "config.json"),
          "--tokenizer-from", str(tmp_path / "tok"), "--seed", "3"])
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(MoekitError, match="already exists"):
        write_synthetic(tmp_path / "out", TINY, num_layers=1, progress=False)
    with pytest.raises(SystemExit, match="already exists"):
        main([str(tmp_path / "out"), "--layers", "1", "--config", str(tmp_path / "config.json")])
    with pytest.raises(MoekitError, match="holds no tokenizer files"):
        write_synthetic(tmp_path / "none", TINY, num_layers=1, progress=False, tokenizer_from=tmp_path)
    assert not (tmp_path / "none").exists()


def test_the_real_config_plans_its_shards_without_weights():
    from moekit.checkpoint.synthetic import disk_layout

    shapes_, keep = disk_layout({**QWEN3_30B_A3B, "num_hidden_layers": 1})
    assert shapes_["model.layers.0.mlp.experts.127.down_proj.weight"][0] == [2048, 768]
    assert shapes_["model.embed_tokens.weight"][0] == [151936, 2048] and "lm_head.weight" in shapes_
    assert keep == {"model.layers.0.mlp.gate.weight"}
    assert len([k for k in shapes_ if ".experts." in k]) == 128 * 3
    assert "lm_head.weight" not in disk_layout({**TINY, "tie_word_embeddings": True})[0]  # save_pretrained drops it
