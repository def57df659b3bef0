"""Which form a checkpoint is in, whether serving engines run it as moekit does, and the one repair moekit makes.

Forms (what ``moekit info`` prints and ``moekit serve-check`` decides on, read from the files alone):

* ``standard``: ``config.json`` + ``*.safetensors`` that plain transformers loads and that runs the same model in
  transformers and in vLLM (same expert count and top-k in every layer, no moekit routing rule).
* ``moekit``: moekit's own form (per-layer expert counts or top-k, a routing rule, moekit-only tensors); the
  weights sit in ``moekit-model.st`` (safetensors content) so that neither transformers nor vLLM loads them by mistake
  (:mod:`moekit.checkpoint.save`); ``moekit.load_model`` rebuilds it. Not servable as-is.
* ``standard`` but **unsafe for vLLM**: a Qwen2-MoE config with ``qkv_bias: false``. transformers then builds
  q/k/v without biases, but vLLM's ``qwen2_moe`` always builds them with biases and leaves the absent ones
  uninitialised: the model loads without an error and generates NaN (every greedy token id 0). moekit
  never writes this form any more (carving writes zero biases and ``qkv_bias: true``, which compute the same);
  older checkpoints are repaired when moekit loads them (:func:`repair_for_engines`), so re-saving fixes them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.checkpoint.paths import non_uniform_weights
from moekit.core.keys import PER_LAYER_EXPERTS_KEY, PER_LAYER_TOP_K_KEY, ROUTE_KEY


@dataclass(frozen=True)
class Form:
    name: str  # "standard", "moekit", "gguf", "hub", "unknown"
    servable: bool  # vLLM runs what transformers / moekit runs
    reason: str = ""  # why not, when not
    fix: str = ""  # the command that makes it servable

    def line(self) -> str:
        if self.servable:
            return f"{self.name} (plain transformers loads it; vLLM serves it)"
        return f"{self.name} (not servable by vLLM: {self.reason}; {self.fix})"


def checkpoint_form(path: str | Path) -> Form:
    """The form of the checkpoint at ``path`` (a directory, a ``.gguf`` file or a hub id), from its files."""
    path = Path(path)
    if str(path).endswith(".gguf"):
        return Form("gguf", False, "moekit writes safetensors; vLLM's GGUF support is partial",
                    "convert it with `moekit convert FILE.gguf --out DIR`")
    if not path.is_dir():
        return Form("hub", False, "not a local directory", "download it, or save it with moekit first")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return Form("unknown", False, "no config.json", "point at a checkpoint directory")
    config = json.loads(cfg_file.read_text())
    if non_uniform_weights(path) is not None or any(k in config for k in (PER_LAYER_EXPERTS_KEY, PER_LAYER_TOP_K_KEY, ROUTE_KEY)):
        what = []
        if PER_LAYER_EXPERTS_KEY in config:
            what.append("different expert counts per layer")
        if PER_LAYER_TOP_K_KEY in config:
            what.append("a different top-k per layer")
        if ROUTE_KEY in config:
            what.append("a moekit routing rule (compensation, adaptive k or super-expert routing)")
        fix = ("make it uniform: `moekit uniform DIR --stats STATS --out NEW`" if PER_LAYER_EXPERTS_KEY in config else
               "re-route it to one top-k with a mitigation that keeps a standard checkpoint: "
               "`moekit route DIR --top-k K -m rescale --out NEW`")
        return Form("moekit", False, ", ".join(what) or "moekit-only tensors", fix)
    if not any(path.glob("*.safetensors")):
        return Form("unknown", False, "no *.safetensors weights", "save it with moekit or transformers' save_pretrained")
    if config.get("model_type") == "qwen2_moe" and not config.get("qkv_bias", False):
        return Form("standard", False, "Qwen2-MoE with qkv_bias false: vLLM builds q/k/v biases anyway and leaves "
                    "them uninitialised (NaN output)", "re-save it through moekit: `moekit convert DIR --out NEW`")
    return Form("standard", True)


@torch.no_grad()
def repair_for_engines(model, *, source: str = "", quiet: bool = False) -> bool:
    """Make ``model`` one that every engine reads the same way, without changing what it computes.

    Today: a Qwen2-MoE without q/k/v biases gets zero biases and ``qkv_bias = True`` (see the module doc).
    Returns whether anything changed; says so in one line on stderr unless ``quiet``.
    """
    config = model.config
    if getattr(config, "model_type", None) != "qwen2_moe" or getattr(config, "qkv_bias", True):
        return False
    from moekit.core.arch import decoder_layers

    for layer in decoder_layers(model):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            lin = getattr(attn, name)
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    config.qkv_bias = True
    if not quiet:
        print(f"moekit: {source or 'the model'} is a Qwen2-MoE without q/k/v biases, which vLLM would run with "
              "uninitialised biases: added zero biases (the same model); save it to keep the repair", file=sys.stderr)
    return True
