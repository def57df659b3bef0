"""Random-weight checkpoints of real configurations, for measuring moekit at scales no test machine downloads.

:func:`write_synthetic` writes a checkpoint in transformers' on-disk form: the tensor names and shapes
``save_pretrained`` writes (per-expert ``mlp.experts.3.gate_proj.weight`` for Qwen3-MoE), taken from transformers
itself -- the model built on the meta device, its in-memory weight conversions (fused experts) reverted. The weights
are scaled like an initialised model (normal, std 0.02; norms ones; biases zero), so forward passes stay sane.
The shards' headers are planned from the shapes first, so each shard is written as a stream, one decoder layer
generated (on ``device``, from a seeded generator), written and freed at a time.

``fp8=True`` stores every 2-D linear weight of the decoder layers (not the norms, routers, embeddings or lm_head)
as float8_e4m3fn with a float32 ``weight_scale_inv`` per 128x128 block, with the ``quantization_config`` of the
Qwen3-30B-A3B-FP8 release. The same seed gives the same weights in both forms: FP8 is the bf16 checkpoint quantized.

    python -m moekit.checkpoint.synthetic OUT --layers 2 [--fp8] [--device cuda] [--tokenizer-from smollm2-moe]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from moekit.checkpoint.safetensors_io import DEFAULT_BLOCK, DTYPES, SCALE_SUFFIX, header_bytes, quantize_fp8_blocks
from moekit.core.device import pick_device
from moekit.errors import MoekitError
from moekit.outputs import staged_dir, write_json

# config.json of Qwen/Qwen3-30B-A3B
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
FP8_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": list(DEFAULT_BLOCK)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
STD = 0.02
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def disk_layout(config: dict) -> tuple[dict[str, tuple[list[int], torch.dtype]], set[str]]:
    """(name -> (shape, dtype) of every tensor ``save_pretrained`` writes for ``config``, the names of the 2-D
    weights inside decoder layers that are not linear layers to quantize: routers and shared-expert gates)."""
    from transformers import AutoConfig
    from transformers.core_model_loading import revert_weight_conversion

    from moekit.checkpoint.read import empty_model
    from moekit.core import arch

    model = empty_model(AutoConfig.for_model(config["model_type"], **{
        k: v for k, v in config.items() if k not in ("model_type", "quantization_config")}))
    state = {k: v for k, v in model.state_dict().items() if k not in model.all_tied_weights_keys}
    disk = revert_weight_conversion(model, state)
    keep = set()
    for m in arch.moe_layers(model):
        block = f"model.layers.{m.index}.{m.family.block_attr}"
        keep |= {f"{block}.{attr}.weight" for attr in (m.family.router_attr, m.family.shared_gate_attr) if attr}
    return {k: (list(v.shape), v.dtype) for k, v in disk.items()}, keep


def quantized(name: str, shape: list[int], keep: set[str]) -> bool:
    """Whether the FP8 form stores ``name`` as float8: a 2-D linear weight inside a decoder layer."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2
            and "norm" not in name and name not in keep)


def scale_shape(shape: list[int]) -> list[int]:
    return [-(-s // b) for s, b in zip(shape, DEFAULT_BLOCK, strict=True)]


def initial(name: str, shape: list[int], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A weight as an initialised model has it: norms ones, other vectors (biases) zeros, matrices N(0, STD)."""
    if not dtype.is_floating_point or len(shape) < 2:
        fill = 1.0 if "norm" in name and dtype.is_floating_point else 0
        return torch.full(shape, fill, dtype=dtype, device=g.device)
    return torch.empty(shape, dtype=dtype, device=g.device).normal_(0.0, STD, generator=g)  # bf16: twice float32's speed


def write_synthetic(out_dir: str | Path, config: dict, *, num_layers: int | None = None,
                    dtype: torch.dtype = torch.bfloat16, fp8: bool = False, seed: int = 0, device: str = "cpu",
                    max_shard_bytes: int = 5 * 2**30, progress: bool = True, tokenizer_from: str | Path | None = None,
                    overwrite: bool = False) -> Path:
    """Write a random-weight checkpoint of ``config`` (a config.json dict) with ``num_layers`` decoder layers (the
    config's own count when None) into ``out_dir``: config.json, ``model-0000k-of-0000N.safetensors`` shards of at
    most ``max_shard_bytes`` (a bigger single tensor gets a shard of its own), ``model.safetensors.index.json``,
    and the tokenizer files of the folder ``tokenizer_from`` when given. The weights are generated on ``device`` from
    ``seed`` (a CUDA generator draws other numbers than the CPU's). Returns ``out_dir``."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["num_hidden_layers"] = n = config["num_hidden_layers"] if num_layers is None else int(num_layers)
    for key in ("layer_types", "mlp_layer_types"):  # per-layer lists follow the layer count
        if isinstance(config.get(key), list):
            config[key] = config[key][:n]
    config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    device = pick_device(device)
    shapes, keep = disk_layout(config)
    if fp8:
        config["quantization_config"] = {**FP8_QUANTIZATION, "modules_to_not_convert": ["lm_head", *sorted(
            k.removesuffix(".weight") for k in keep)]}

    # what is written, in order: the tensors outside the layers first, then layer by layer; an FP8 weight's scales
    # right after it
    groups = [[k for k in shapes if not k.startswith("model.layers.")]]
    groups += [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(n)]
    plan = [[] for _ in groups]  # per group: (name, safetensors dtype, shape)
    for names, entries in zip(groups, plan, strict=True):
        for name in names:
            shape, stored = shapes[name]
            if fp8 and quantized(name, shape, keep):
                entries += [(name, "F8_E4M3", shape), (name + SCALE_SUFFIX, "F32", scale_shape(shape))]
            else:
                entries.append((name, DTYPE_NAMES[dtype if stored.is_floating_point else stored], shape))

    # shards: consecutive tensors up to max_shard_bytes each, their headers known before any data is written
    shards: list[dict] = [{}]
    size = 0
    for name, st_dtype, shape in sum(plan, []):
        nbytes = DTYPES[st_dtype].itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [size, size + nbytes]}
        size += nbytes
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    shard_of = {name: k for k, shard in enumerate(shards) for name in shard}
    total = sum(e["data_offsets"][1] - e["data_offsets"][0] for shard in shards for e in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": {name: files[k] for name, k in shard_of.items()}}

    with staged_dir(out_dir, overwrite) as tmp:
        write_json(tmp / "config.json", config)
        write_json(tmp / "model.safetensors.index.json", index)
        fh, current = None, None
        try:
            for i, entries in enumerate(tqdm(plan, desc="synthetic", unit="group", disable=not progress)):
                g = torch.Generator(device).manual_seed(seed * 1_000_003 + i)
                made = {}
                for name in groups[i]:
                    shape, stored = shapes[name]
                    made[name] = initial(name, shape, dtype if stored.is_floating_point else stored, g)
                    if fp8 and quantized(name, shape, keep):
                        made[name], made[name + SCALE_SUFFIX] = quantize_fp8_blocks(made[name], DEFAULT_BLOCK)
                for name, _, _ in entries:
                    if shard_of[name] != current:
                        if fh is not None:
                            fh.close()
                        current = shard_of[name]
                        fh = open(tmp / files[current], "wb")  # noqa: SIM115 (one open shard across layers)  # writes inside a staged_dir
                        fh.write(header_bytes(shards[current], {"format": "pt"}))
                    fh.write(memoryview(made.pop(name).cpu().contiguous().view(-1).view(torch.uint8).numpy()))
        finally:
            if fh is not None:
                fh.close()
        if tokenizer_from is not None:
            found = [Path(tokenizer_from) / f for f in TOKENIZER_FILES if (Path(tokenizer_from) / f).is_file()]
            if not found:
                raise MoekitError(f"'{tokenizer_from}' holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])} ...): "
                                  "give the folder of a saved tokenizer")
            for f in found:
                shutil.copyfile(f, tmp / f.name)  # writes inside a staged_dir
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    import json

    from moekit.cli.checks import check_device
    from moekit.errors import reading

    p = argparse.ArgumentParser(prog="python -m moekit.checkpoint.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write (must not exist, or be empty, unless --overwrite)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    p.add_argument("--config", default=None, help="a config.json to use instead of Qwen3-30B-A3B's")
    p.add_argument("--fp8", action="store_true", help="FP8 block-scaled linear weights, as the Qwen3 FP8 releases")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="where the weights are generated: cpu, cuda[:N] or auto (cuda "
                   "when there is one: much faster; the seed gives other weights there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard in GiB")
    p.add_argument("--tokenizer-from", default=None, help="copy the tokenizer of this folder or model name ('smollm2-moe')")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        check_device(a.device)
        config = QWEN3_30B_A3B
        if a.config is not None:
            with reading(a.config, "config", "give a model's config.json"):
                config = json.loads(Path(a.config).read_text())
        tok = None
        if a.tokenizer_from is not None:
            from moekit.checkpoint.load import resolve

            tok = resolve(a.tokenizer_from)
        write_synthetic(a.out, config, num_layers=a.layers, dtype=getattr(torch, a.dtype), fp8=a.fp8, seed=a.seed,
                        device=a.device, max_shard_bytes=int(a.max_shard_gb * 2**30), tokenizer_from=tok,
                        overwrite=a.overwrite)
    except MoekitError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
