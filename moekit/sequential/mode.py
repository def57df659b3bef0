"""In memory or layer by layer: which mode a command runs in.

``--mode memory`` loads the whole model (any source: local folder, GGUF, hub id; device maps apply);
``--mode sequential`` walks a local checkpoint one decoder layer at a time (:mod:`moekit.sequential.engine`);
``--mode auto`` (the default) loads the model when it fits in the memory free on the device, and otherwise goes
layer by layer, saying so in one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moekit.errors import MoekitError

MODES = ("auto", "memory", "sequential")
HELP = ("memory (load the whole model), sequential (one decoder layer at a time, read from the checkpoint's shards: "
        "any size in the memory of one layer) or auto (sequential when the model does not fit in free memory)")
MARGIN = 1.15  # activations, the save's buffers and the allocator's slack on top of the weights


def model_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters at ``dtype``, counted on the meta device (no weights read)."""
    from moekit.checkpoint.read import skeleton

    model = skeleton(path)
    return sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()


def choose_mode(model: str, mode: str, *, device: str | None = None, dtype=None, command: str = "this command") -> str:
    """'memory' or 'sequential' for ``model`` (a name as the CLI takes it), under ``mode`` (one of :data:`MODES`)."""
    from moekit.checkpoint.load import local_checkpoint, resolve
    from moekit.core.device import available_bytes, pick_device, pick_dtype

    if mode not in MODES:
        raise MoekitError(f"unknown --mode '{mode}': use {', '.join(MODES)}")
    if mode == "memory":
        return mode
    path = resolve(model)
    local = not isinstance(path, str) and Path(path).is_dir()
    if mode == "sequential":
        local_checkpoint(model, purpose="--mode sequential")  # the one-line error for anything else
        return mode
    if not local:
        return "memory"
    dev = pick_device(device)
    need = model_bytes(Path(path), pick_dtype(dtype, dev)) * MARGIN
    free = available_bytes(dev)
    if need <= free:
        return "memory"
    print(f"moekit {command}: '{model}' needs about {need / 2**30:.1f} GiB in memory, {free / 2**30:.1f} GiB are free on "
          f"{dev}: running layer by layer (--mode sequential; --mode memory loads it whole anyway)", file=sys.stderr)
    return "sequential"
