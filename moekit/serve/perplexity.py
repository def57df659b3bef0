"""Perplexity measured inside vLLM: the same windows as :func:`moekit.eval.perplexity.perplexity`, scored by
vLLM's prompt log-probabilities, so a checkpoint only vLLM runs (a compressed-tensors quantization, say) gets
the number an in-process model gets, on the same tokens."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moekit.checkpoint.forms import checkpoint_form
from moekit.errors import MoekitError
from moekit.serve.check import run_vllm
from moekit.serve.vllm_env import find_vllm_python


def vllm_perplexity(path: str | Path, tokens: torch.Tensor, *, dtype: str = "auto", engine: dict | None = None,
                    vllm_python: str | Path | None = None, timeout_s: int = 3600) -> dict:
    """exp(mean NLL) of every window in ``tokens`` [n, L] in a fresh vLLM engine: {"value", "tokens", "vllm_version"}."""
    path = Path(path)
    form = checkpoint_form(path)
    if not form.servable:
        raise MoekitError(f"'{path}' is not a checkpoint vLLM serves ({form.reason}): {form.fix}")
    request = {"model": str(path.resolve()), "windows": tokens.tolist(), "dtype": dtype,
               "max_model_len": int(tokens.shape[1]) + 1, "engine": {"gpu_memory_utilization": 0.15, **(engine or {})}}
    (response,) = run_vllm([request], find_vllm_python(vllm_python), timeout_s)
    if "error" in response:
        raise MoekitError(f"vLLM could not score '{path}': {response['error']}")
    if not response["tokens"]:
        raise MoekitError(f"vLLM returned no scored tokens for '{path}'")
    return {"value": math.exp(response["nll"] / response["tokens"]), "tokens": response["tokens"],
            "vllm_version": response["vllm_version"]}
