"""Device maps: a model spread over GPUs, the CPU and disk (accelerate places it; transformers' ``from_pretrained``
for the standard form, :func:`dispatch` for moekit's own form), and the memory each way of running needs.

* :func:`parse_device_map` / :func:`parse_max_memory`: the ``--device-map`` / ``--max-memory`` text (or Python
  values) -> what ``from_pretrained`` takes, every device checked against this machine.
* :func:`check_fits`: a map naming modules the model lacks, or a budget too small for one decoder layer, refused
  before any weight is read (on the meta model).
* :func:`memory_needs` / :func:`plan`: what ``moekit info`` prints.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from pathlib import Path

from moekit.errors import MoekitError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICES = "cpu, disk, a GPU index N (or cuda:N) or mps"


def parse_device(value, what: str = "--device-map") -> int | str:
    """One device of a map or budget: 'cpu', 'disk', 'mps', or a GPU as N / 'N' / 'cuda:N' / 'cuda' (-> N)."""
    import torch

    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and re.fullmatch(r"\d+|cuda(:\d+)?", value):
        index = int(value.removeprefix("cuda").removeprefix(":") or 0)
    elif value in ("cpu", "disk"):
        return value
    elif value == "mps":
        if not torch.backends.mps.is_available():
            raise MoekitError(f"{what}: device 'mps': this machine has no MPS device; use {DEVICES}")
        return value
    else:
        raise MoekitError(f"{what}: unknown device {value!r}: use {DEVICES}")
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        have = f"cuda:0 to cuda:{count - 1}" if count else "none; use cpu (and disk)"
        raise MoekitError(f"{what}: device {value!r} does not exist: this machine has {count} CUDA device(s) ({have})")
    return index


def parse_device_map(value) -> str | dict | None:
    """``--device-map``: None; a strategy (auto, balanced, balanced_low_0, sequential); one device (the whole model
    there); a ``{module: device}`` dict, its JSON text, or a .json file holding it."""
    if value is None or isinstance(value, dict):
        obj = value
    elif isinstance(value, int) and not isinstance(value, bool):
        return {"": parse_device(value)}
    else:
        text = str(value).strip()
        if text in STRATEGIES:
            return text
        if text.startswith("{"):
            obj = _json(text, "--device-map")
        elif text.endswith(".json") or Path(text).expanduser().is_file():
            path = Path(text).expanduser()
            if not path.is_file():
                raise MoekitError(f"--device-map '{text}' does not exist: give a JSON map, a .json file, or one of "
                                  f"{', '.join(STRATEGIES)}")
            obj = _json(path.read_text(encoding="utf-8", errors="replace"), f"--device-map file '{text}'")
        else:
            return {"": parse_device(text)}
    if obj is None:
        return None
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise MoekitError('--device-map must map module names to devices, e.g. {"model.embed_tokens": 0, '
                          '"model.layers.0": 0, "": "cpu"}')
    return {k: parse_device(v) for k, v in obj.items()}


def parse_max_memory(value) -> dict | None:
    """``--max-memory``: '0=20GiB,cpu=60GiB', JSON '{"0": "20GiB", "cpu": "60GiB"}' or a dict -> {device: bytes}."""
    from accelerate.utils import convert_file_size_to_int

    if value is None:
        return None
    if isinstance(value, dict):
        items = list(value.items())
    elif str(value).strip().startswith("{"):
        obj = _json(str(value), "--max-memory")
        if not isinstance(obj, dict):
            raise MoekitError('--max-memory JSON must be an object, e.g. {"0": "20GiB", "cpu": "60GiB"}')
        items = list(obj.items())
    else:
        items = [part.partition("=")[::2] for part in str(value).split(",") if part.strip()]
    if not items:
        raise MoekitError("--max-memory is empty: pass DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB")
    out = {}
    for key, size in items:
        key, size = str(key).strip(), str(size).strip()
        if not key or not size:
            raise MoekitError(f"--max-memory item '{key}={size}' is not DEVICE=SIZE (e.g. 0=20GiB,cpu=60GiB)")
        try:
            out[parse_device(key, "--max-memory")] = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except ValueError:
            raise MoekitError(f"--max-memory size '{size}' for {key} is not a size: use bytes or e.g. 500MiB, 20GiB") from None
    return out


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MoekitError(f"{what} is not valid JSON ({e.msg}, column {e.colno})") from None


# ------------------------------------------------------------------------------------------- sizes on the meta model
def tensor_bytes(model) -> dict[str, int]:
    """Bytes of each parameter and buffer (tied weights once), at the dtype the model is in (meta is fine)."""
    return {n: t.numel() * t.element_size() for n, t in chain(model.named_parameters(), model.named_buffers())}


def module_bytes(model, name: str, sizes: dict[str, int] | None = None) -> int:
    sizes = tensor_bytes(model) if sizes is None else sizes
    return sum(b for n, b in sizes.items() if not name or n == name or n.startswith(name + "."))


def layer_bytes(model, sizes: dict[str, int] | None = None) -> int:
    """Bytes of the largest decoder layer."""
    from moekit.core.arch import decoder_layers

    layers = {id(m) for m in decoder_layers(model)}
    return max(module_bytes(model, n, sizes) for n, m in model.named_modules() if id(m) in layers)


def memory_needs(model) -> dict[str, int]:
    """Bytes each mode holds (weights only, activations excluded), for a model at its target dtype (meta is fine):
    ``load`` every weight; ``load_and_save`` load + the save's working set (one decoder layer in checkpoint form at a time; the save
    reloads the written checkpoint to compare logits only when the model fits twice);
    ``sequential`` three decoder layers (the largest) + embeddings + lm_head, the layer-by-layer modes."""
    sizes = tensor_bytes(model)
    total = sum(sizes.values())
    ends = {id(e.weight): e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}
    layer = layer_bytes(model, sizes)
    return {"load": total, "load_and_save": total + layer,
            "sequential": 3 * layer + sum(w.numel() * w.element_size() for w in ends.values())}


def resolve_map(model, device_map, max_memory=None) -> dict:
    """A strategy -> the ``{module: device}`` map ``from_pretrained`` would use (transformers' own computation)."""
    if not isinstance(device_map, str):
        return device_map
    from transformers.integrations.accelerate import _get_device_map

    return dict(_get_device_map(model, device_map, max_memory, None))


def plan(model, device_map, max_memory=None) -> dict[str, int]:
    """Bytes on each device under ``device_map`` (a strategy is resolved as ``from_pretrained`` resolves it)."""
    from transformers.integrations.accelerate import expand_device_map

    sizes = tensor_bytes(model)
    out: dict[str, int] = {}
    for name, device in expand_device_map(resolve_map(model, device_map, max_memory), list(sizes)).items():
        out[str(device)] = out.get(str(device), 0) + sizes[name]
    return out


def check_fits(model, device_map, max_memory, offload_folder) -> None:
    """Refuse a placement that cannot work: a map naming a module ``model`` lacks or leaving a tensor without a
    device, disk without an offload folder, a budget with no explicit map, or a budget below one decoder layer."""
    if isinstance(device_map, dict):
        modules = dict(model.named_modules())
        for key in device_map:
            if key and key not in modules:
                tops = ", ".join(n for n in modules if n and n.count(".") <= 1)
                raise MoekitError(f"--device-map names '{key}', which {type(model).__name__} does not have ({tops} ...)")
        for name in tensor_bytes(model):
            if not any(not k or name == k or name.startswith(k + ".") for k in device_map):
                raise MoekitError(f"--device-map gives no device to '{name}': add its module, or \"\" for everything else")
        if "disk" in device_map.values() and offload_folder is None:
            raise MoekitError("--device-map puts modules on disk: pass --offload-folder DIR for their weights")
        if max_memory:
            raise MoekitError("--max-memory budgets the strategies (auto, balanced, sequential), not an explicit "
                              "module map: drop one of them")
    budgets = [b for d, b in (max_memory or {}).items() if d != "disk"]
    need = layer_bytes(model)
    if budgets and max(budgets) < need and offload_folder is None:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        raise MoekitError(f"--max-memory gives each device at most {gib(max(budgets))} and one decoder layer needs "
                          f"{gib(need)} at {dtype}: raise a budget to at least {gib(need)}, or pass --offload-folder "
                          "DIR to keep layers on disk")


def dispatch(model, device_map, max_memory=None, offload_folder=None):
    """Place a model moekit built itself as ``from_pretrained`` places a loaded one: strategies through
    accelerate's ``infer_auto_device_map`` (the model's decoder layers unsplit), then ``dispatch_model``. Offloaded
    weights go to a new folder inside ``offload_folder`` (accelerate would reuse another model's index.json)."""
    import tempfile

    from accelerate import dispatch_model

    device_map = resolve_map(model, device_map, max_memory)
    if "disk" in device_map.values():
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        offload_folder = tempfile.mkdtemp(prefix="moekit-offload-", dir=offload_folder)  # not an output: accelerate's scratch
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder,
                          skip_keys=getattr(model, "_skip_keys_device_placement", None))


def gib(n: int) -> str:
    """``n`` bytes in the largest unit that keeps it at least 1 (rounded up: budgets named from it suffice)."""
    import math

    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n >= 1024**power:
            return f"{math.ceil(n / 1024**power * 100) / 100:.2f} {unit}"
    return f"{n} bytes"
