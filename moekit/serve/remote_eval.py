"""lm-evaluation-harness's vLLM backend, run inside the vLLM environment.

vLLM pins its own torch and transformers, so ``moekit eval --backend vllm`` from moekit's environment hands the
job to the vLLM environment's Python (where ``moekit vllm-env`` also installed moekit and lm-eval, so the same
offline task configs and result schema apply): ``python -m moekit.eval.vllm_entry REQUEST.json RESPONSE.json``.
Inside an environment that has vLLM, :func:`moekit.eval.harness.evaluate_checkpoint` runs in process instead.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from moekit.errors import MoekitError


def evaluate_in_vllm_env(python: Path, kwargs: dict, timeout_s: int = 24 * 3600) -> dict:
    """Run ``evaluate_checkpoint(**kwargs, backend="vllm")`` with the vLLM environment's Python; its result."""
    with tempfile.TemporaryDirectory(prefix="moekit-eval-") as tmp:
        req, resp, log = Path(tmp) / "request.json", Path(tmp) / "response.json", Path(tmp) / "eval.log"
        req.write_text(json.dumps(kwargs))  # not an output: the worker's request, in a private folder
        with open(log, "w") as f:  # not an output: the worker's log, in a private folder
            try:
                proc = subprocess.run([str(python), "-m", "moekit.eval.vllm_entry", str(req), str(resp)], stdout=f,
                                      stderr=subprocess.STDOUT, timeout=timeout_s, cwd=tmp, env=_env())
            except subprocess.TimeoutExpired:
                raise MoekitError(f"evaluation in vLLM did not finish within {timeout_s} s") from None
        text = log.read_text(errors="replace")
        if "No module named moekit" in text or "No module named 'moekit'" in text:
            raise MoekitError(f"moekit is not installed in the vLLM environment ({python}): recreate it with "
                              "`moekit vllm-env`, which installs moekit and lm-eval there too")
        if proc.returncode != 0 or not resp.exists():
            tail = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
            raise MoekitError(f"evaluation in the vLLM environment failed (exit {proc.returncode}): {tail[0][:300]}")
        out = json.loads(resp.read_text())
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
