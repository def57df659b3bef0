"""lm-evaluation-harness's vLLM backend, run inside the vLLM environment.

vLLM pins its own torch and transformers, so ``moekit eval --backend vllm`` from moekit's environment hands the
job to the vLLM environment's Python (where ``moekit vllm-env`` also installed moekit and lm-eval, so the same
offline task configs and result schema apply): ``python -m moekit.eval.vllm_entry REQUEST.json RESPONSE.json``.
Inside an environment that has vLLM, :func:`moekit.eval.harness.evaluate_checkpoint` runs in process instead.
"""

from __future__ import annotations

from pathlib import Path

from moekit.errors import MoekitError
from moekit.serve.envs import run_worker


def evaluate_in_vllm_env(python: Path, kwargs: dict, timeout_s: int = 24 * 3600) -> dict:
    """Run ``evaluate_checkpoint(**kwargs, backend="vllm")`` with the vLLM environment's Python; its result."""
    out = run_worker([str(python), "-m", "moekit.eval.vllm_entry"], kwargs, timeout_s=timeout_s,
                     what="evaluation in the vLLM environment", env=_env())
    if "error" in out:
        raise MoekitError(out["error"])
    return out["result"]


def _env() -> dict:
    """The environment for the vLLM side: a source checkout of moekit goes first on its path, so both sides run
    the same moekit code (an installed moekit's own folder is never added: it would bring this side's torch)."""
    import os

    import moekit

    env = dict(os.environ)
    root = Path(moekit.__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env
