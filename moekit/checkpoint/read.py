"""Reading checkpoints: a local safetensors directory, a hub id, a GGUF file, and moekit's non-uniform form.

Each reader returns ``(model, tokenizer or None)``; :func:`moekit.checkpoint.load.load_model` picks one.
Pickle weights are refused; remote code runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.core import arch
from moekit.core.keys import PER_LAYER_EXPERTS_KEY, PER_LAYER_TOP_K_KEY, ROUTE_KEY
from moekit.checkpoint.paths import PICKLE_SUFFIXES, non_uniform_weights, weight_files
from moekit.errors import MoekitError, reading

FIX = "re-download it or save it again (a copy cut short or edited by hand does not load)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def read_tokenizer(source, **kw):
    """The tokenizer at ``source``, or None. transformers 5 builds an empty one-token tokenizer for a directory
    with no tokenizer files, so a local directory must hold one of them."""
    from transformers import AutoTokenizer

    if Path(source).is_dir() and "gguf_file" not in kw and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError, TypeError):
        return None
    return tok if len(tok) > 1 else None


def read_dir(path: Path, dtype, trust_remote_code: bool, device_map, max_memory=None, offload_folder=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    check_checkpoint_dir(path)
    with reading(path, "checkpoint", FIX):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    arch.check_supported(config)
    tok = read_tokenizer(path, trust_remote_code=trust_remote_code)
    placement = dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    with reading(path, "checkpoint", FIX):
        if non_uniform_weights(path) is not None:
            model = read_non_uniform(path, config, dtype, **placement)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **placement
            )
    restore_moekit_state(model)
    return model, tok


def check_checkpoint_dir(path: Path) -> None:
    """Refuse, with the reason, a path that is not a safetensors checkpoint directory (nothing is read)."""
    if path.is_file():
        raise MoekitError(f"'{path}' is a file: pass the checkpoint directory (or a .gguf file)")
    files = list(path.iterdir())
    if not files:
        raise MoekitError(f"model directory '{path}' is empty: point at a directory holding config.json and *.safetensors")
    if not (path / "config.json").exists():
        raise MoekitError(f"'{path}' has no config.json: it is not a transformers checkpoint directory")
    has_st = any(f.name.endswith(".safetensors") for f in files) or non_uniform_weights(path) is not None
    if not has_st:
        if any(f.name.endswith(PICKLE_SUFFIXES) for f in files):
            raise MoekitError(
                f"'{path}' holds only pickle weights, which can run arbitrary code when loaded; moekit reads safetensors "
                "only: convert it with transformers' save_pretrained(safe_serialization=True) in a trusted environment"
            )
        raise MoekitError(f"'{path}' has no *.safetensors weights")


def check_shapes(path: Path, model) -> None:
    """The safetensors files of ``path`` are whole and each tensor ``model`` (a meta skeleton) has under the same
    name has its shape there; only the headers are read."""
    from safetensors import safe_open

    expected = model.state_dict()
    for file in weight_files(path):
        with reading(file, "checkpoint", FIX), safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = list(f.get_slice(key).get_shape())
                if key in expected and shape != list(expected[key].shape):
                    raise MoekitError(f"checkpoint '{path}': the weights do not have the shapes its config.json "
                                      f"describes ({key} is {shape} in {file.name}, {list(expected[key].shape)} in the "
                                      f"config): {FIX}")


def hub_config(name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise MoekitError(f"cannot reach '{name}' on the hub ({type(e).__name__}); check the id and the network, or pass a local directory") from None
    arch.check_supported(config)
    return config


def read_hub(name: str, dtype, trust_remote_code: bool, device_map, max_memory=None, offload_folder=None):
    from transformers import AutoModelForCausalLM

    hub_config(name, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                 device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    restore_moekit_state(model)
    return model, read_tokenizer(name, trust_remote_code=trust_remote_code)


def read_gguf(file: Path, dtype):
    """Read a GGUF file with transformers and rebuild it as a plain (unquantized) model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not file.exists():
        raise MoekitError(f"GGUF file '{file}' does not exist")
    with reading(file, "GGUF file", "re-download it, or convert the checkpoint again"):
        gguf = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    config_dict = gguf.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict(), strict=True)
    plain.tie_weights()
    plain.to(dtype)
    tok = read_tokenizer(file.parent, gguf_file=file.name)
    return plain, tok


def read_non_uniform(path: Path, config, dtype, device_map=None, max_memory=None, offload_folder=None):
    """Rebuild a model whose layers hold different expert counts (moekit's opt-in form), placed by ``device_map``
    (:func:`moekit.checkpoint.device_map.dispatch`) when one is given."""
    from safetensors.torch import load_file

    model = empty_model(config)
    # Read shard by shard. Tensors straight from the memory-mapped file start at the header's offset, not on a
    # 64-byte boundary, and torch's grouped expert matmul takes another (last-bit different) kernel for unaligned
    # weights: own copies make the reloaded model compute exactly what the saved one did.
    state = {k: v.clone() for file in weight_files(path) for k, v in load_file(str(file)).items()}
    for key, value in state.items():  # moekit-only buffers (e.g. moekit_mean_out) do not exist before loading
        owner, _, leaf = key.rpartition(".")
        if leaf.startswith("moekit_"):
            model.get_submodule(owner).register_buffer(leaf, value)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise MoekitError(f"'{path}' does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    # non-persistent buffers (rotary frequencies) were never on meta; anything left on meta is a bug
    for n_, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise MoekitError(f"'{path}': tensor {n_} was not found in the checkpoint")
    model = model.to(dtype)
    if device_map is not None:
        from moekit.checkpoint.device_map import dispatch

        model = dispatch(model, device_map, max_memory, offload_folder)
    return model


def resize_empty(layer: arch.MoELayer, n: int) -> None:
    ex, r = layer.experts, layer.router_linear
    e, z = layer.num_experts, layer.num_zero_experts  # zero experts (LongCat-Flash): Z more router rows, gate_up rows
    for name in arch.EXPERT_TENSORS:
        t = getattr(ex, name, None)
        if t is not None:
            rows = n + (t.shape[0] - e if z else 0)
            setattr(ex, name, torch.nn.Parameter(torch.empty((rows, *t.shape[1:]), device="meta", dtype=t.dtype)))
    r.weight = torch.nn.Parameter(torch.empty((n + z, r.weight.shape[1]), device="meta", dtype=r.weight.dtype))
    if getattr(r, "bias", None) is not None:
        r.bias = torch.nn.Parameter(torch.empty(n + z, device="meta", dtype=r.bias.dtype))
    owner = layer.selection_bias_owner
    if owner is not None:
        module, name = owner
        old = getattr(module, name)
        # the experts are on the last dim; leading dims stay (ERNIE-4.5's [1, E])
        new = torch.empty((*old.shape[:-1], n + z), device="meta", dtype=old.dtype)
        setattr(module, name, torch.nn.Parameter(new, requires_grad=False) if isinstance(old, torch.nn.Parameter) else new)
    layer._set_counts(n)


def restore_moekit_state(model) -> None:
    """Apply what moekit recorded in the config that plain transformers does not read."""
    per_k = getattr(model.config, PER_LAYER_TOP_K_KEY, None)
    if per_k:
        for layer in arch.moe_layers(model):
            k = int(per_k.get(str(layer.index), layer.top_k))
            layer.router.top_k = k
            if hasattr(layer.block, "top_k"):
                layer.block.top_k = k
    if getattr(model.config, ROUTE_KEY, None):
        from moekit.route.runtime import restore

        restore(model)


def empty_model(config):
    """The model of ``config`` on the meta device, each MoE layer at the expert count the config records."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    counts = getattr(config, PER_LAYER_EXPERTS_KEY, None) or {}
    for layer in arch.moe_layers(model):
        n = int(counts.get(str(layer.index), layer.num_experts))
        if n != layer.num_experts:
            resize_empty(layer, n)
    return model


def skeleton(path: Path, config=None):
    """The model of ``path`` on the meta device, at its per-layer expert counts, with moekit's routing state
    restored (non-persistent buffers such as rotary frequencies are real)."""
    from transformers import AutoConfig

    config = config or AutoConfig.from_pretrained(path)
    arch.check_supported(config)
    model = empty_model(config)
    restore_moekit_state(model)
    return model.eval()
