"""moekit/checkpoint/safetensors_io.py: FP8 block-scaled weights read dequantized, incomplete checkpoints refused in
one line, decoder layers beyond the config's count found."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from moekit.checkpoint.safetensors_io import (CheckpointReader, dequantize_fp8_blocks, fp8_block_size,
                                              quantize_fp8_blocks)
from moekit.errors import MoekitError

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def block_error_bound(w, block):
    """Half the spacing of e4m3 values at the top of each block's range (16 of 448), per element; a midpoint
    rounds by exactly that, so float32 rounding gets a little room."""
    (o, i), (b0, b1) = w.shape, block
    amax = torch.zeros(-(-o // b0), -(-i // b1))
    for r in range(amax.shape[0]):
        for c in range(amax.shape[1]):
            amax[r, c] = w[r * b0:(r + 1) * b0, c * b1:(c + 1) * b1].abs().max()
    return (amax * 16 / 448 * (1 + 1e-4)).repeat_interleave(b0, 0)[:o].repeat_interleave(b1, 1)[:, :i] + 1e-12


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((200, 130), (128, 128)), ((5, 7), (128, 128)),
                                         ((70, 50), (32, 16))])
def test_fp8_blocks_round_trip(shape, block):
    w = torch.randn(shape) * 0.02
    w[0, 0] = 3.0  # one block with a far larger range than the others
    q, scale = quantize_fp8_blocks(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and list(scale.shape) == [-(-shape[0] // block[0]), -(-shape[1] // block[1])]
    back = dequantize_fp8_blocks(q, scale, block)
    assert ((back - w).abs() <= block_error_bound(w, block)).all()
    rows = torch.tensor([0, 3, shape[0] - 1])
    assert torch.equal(dequantize_fp8_blocks(q[rows], scale, block, rows=rows), back[rows])


def fp8_checkpoint(path, block=(128, 128), config=True):
    w = torch.randn(200, 300) * 0.05
    q, scale = quantize_fp8_blocks(w, block)
    tensors = {"model.layers.0.q.weight": q, "model.layers.0.q.weight_scale_inv": scale,
               "model.layers.0.norm.weight": torch.ones(300, dtype=torch.bfloat16)}
    save_file(tensors, str(path / "model.safetensors"))
    if config:
        (path / "config.json").write_text(json.dumps({"quantization_config": {**FP8, "weight_block_size": list(block)}}))
    return dequantize_fp8_blocks(q, scale, block)


@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_reader_dequantizes_fp8(tmp_path, block):
    want = fp8_checkpoint(tmp_path, block)
    reader = CheckpointReader(tmp_path)
    assert reader.block == block and reader.is_fp8 and reader.stored_dtypes == {"F8_E4M3", "BF16"}
    got = reader.tensor("model.layers.0.q.weight")
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(reader.tensor("model.layers.0.q.weight", torch.bfloat16), want.to(torch.bfloat16))
    layer = reader.read("model.layers.0.")
    assert set(layer) == {"q.weight", "norm.weight"} and torch.equal(layer["q.weight"], want)
    rows = torch.tensor([0, 1, 63, 64, 127, 128, 199])  # across row blocks of both sizes
    assert torch.equal(reader.rows("model.layers.0.q.weight", rows), want[rows])
    assert reader.tensor("model.layers.0.q.weight_scale_inv").dtype == torch.float32  # still readable by name


def test_a_checkpoint_in_bf16_says_so(tmp_path):
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.arange(4)}, str(tmp_path / "m.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert reader.stored_dtypes == {"BF16", "I64"} and not reader.is_fp8 and reader.block == (128, 128)
    assert reader.tensor("a", torch.float32).dtype == torch.float32


def test_fp8_e5m2_and_the_default_block(tmp_path):
    w = torch.randn(130, 260)
    scale = torch.rand(2, 3) + 0.5
    save_file({"w": w.to(torch.float8_e5m2), "w_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    reader = CheckpointReader(tmp_path)  # no config.json: 128x128 blocks
    assert reader.stored_dtypes == {"F8_E5M2"} and reader.is_fp8
    assert torch.equal(reader.tensor("w"), dequantize_fp8_blocks(w.to(torch.float8_e5m2), scale))


def test_fp8_without_scales_or_with_the_wrong_ones(tmp_path):
    save_file({"w.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
               "v.weight": torch.zeros(300, 4, dtype=torch.float8_e4m3fn), "v.weight_scale_inv": torch.ones(1, 1)},
              str(tmp_path / "m.safetensors"))
    reader = CheckpointReader(tmp_path)
    with pytest.raises(MoekitError, match=r"^tensor w.weight is float8 without its weight_scale_inv: the checkpoint "
                                          r"is incomplete; re-download it$"):
        reader.tensor("w.weight")
    with pytest.raises(MoekitError, match="scales \\[1, 1\\]"):
        reader.read("v.")


def test_fp8_block_size_from_the_config():
    assert fp8_block_size({"quantization_config": FP8}) == (128, 128)
    assert fp8_block_size({"quantization_config": {"quant_method": "fp8"}}) == (128, 128)
    assert fp8_block_size({"quantization_config": {**FP8, "weight_block_size": [64, 32]}}) == (64, 32)
    assert fp8_block_size({"quantization_config": {"quant_method": "gptq"}}) is None
    assert fp8_block_size({}) is None


def test_missing_shards_are_one_line(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoekitError, match=r"shard 'model-00002-of-00002.safetensors' of the checkpoint .* index names is "
                                          r"missing: the download is incomplete; re-download the checkpoint"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "blob-never-downloaded")
    with pytest.raises(MoekitError, match="'model-00002-of-00002.safetensors' .* is a broken link"):
        CheckpointReader(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(MoekitError, match="checkpoint index .* is not valid JSON"):
        CheckpointReader(tmp_path)


def test_an_index_leaves_other_safetensors_out(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    save_file({"consolidated.a": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(CheckpointReader(tmp_path).where) == {"a"}


def test_no_weights_is_one_line(tmp_path):
    with pytest.raises(MoekitError, match="has no \\*.safetensors weights"):
        CheckpointReader(tmp_path)


def test_extra_layers_beyond_the_config(tmp_path):
    # DeepSeek-V3 stores its multi-token-prediction layer as model.layers.61 (num_hidden_layers 61)
    save_file({f"model.layers.{i}.w": torch.zeros(1) for i in (0, 1, 2, 3)} | {"model.norm.weight": torch.zeros(1)},
              str(tmp_path / "m.safetensors"))
    reader = CheckpointReader(tmp_path)
    assert reader.extra_layers(3) == [3] and reader.extra_layers(2) == [2, 3] and reader.extra_layers(4) == []


def test_readers_are_read_when_their_converter_runs(tmp_path):
    """One layer of a per-expert checkpoint handed to transformers' converters as functions: each tensor is read
    once, when its group is converted, and the result equals converting the tensors read up front."""
    from tiny import tiny_model

    from moekit.checkpoint.names import to_model_names

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path)
    prefix = "model.layers.0."
    calls = []
    lazy = {k: (lambda f=f, k=k: calls.append(k) or f()) for k, f in reader.readers(prefix).items()}
    assert not calls
    got = to_model_names(model, lazy)
    assert sorted(calls) == sorted(lazy)  # every tensor read exactly once
    want = to_model_names(model, {prefix + k: v for k, v in reader.read(prefix).items()})
    assert set(got) == set(want) and "model.layers.0.mlp.experts.gate_up_proj" in got
    assert all(torch.equal(got[k], want[k]) for k in want)
