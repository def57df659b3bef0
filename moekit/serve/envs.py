"""Client environments (vLLM, llm-compressor): finding their Python, building them, running a worker script there.

Both pin their own torch and transformers, so each lives in its own virtual environment and moekit talks to it
through a worker script: a JSON request file in, a JSON response file out, the worker's output in a log whose last
line becomes the error when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from moekit.errors import MoekitError


def find_python(explicit: str | Path | None, *, option: str, env_var: str, default_dir: Path, what: str,
                create: str) -> Path:
    """``explicit`` (the ``option``), else ``$env_var``, else ``default_dir/bin/python``; or one line saying how to
    make the environment (``create``)."""
    for candidate, origin in ((explicit, option), (os.environ.get(env_var), f"${env_var}")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise MoekitError(f"{origin} '{candidate}' is not a file: point it at the python of {what}")
            return path
    path = default_dir / "bin" / "python"
    if path.is_file():
        return path
    raise MoekitError(f"no {what}: create one with {create}, or pass {option} / set {env_var}")


def run_step(cmd: list[str], what: str, ok_codes=(0,)) -> None:
    """One step of building an environment; its failure is one line."""
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        raise MoekitError(f"{what}: '{cmd[0]}' not found")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in ok_codes:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MoekitError(f"{what} failed (exit {proc.returncode}): {tail[0]}")


def leave_worker(code: int) -> None:
    """End a vLLM worker once its response is written: its child processes stopped, no interpreter teardown for
    vLLM's engine threads to abort (:func:`moekit.serve.vllm_worker.leave`)."""
    from moekit.serve.vllm_worker import leave

    leave(code)


def run_worker(argv: list[str], request: dict, *, timeout_s: int, what: str, hint: str = "",
               env: dict | None = None) -> dict:
    """Run ``argv + [REQUEST.json, RESPONSE.json]`` in a private temporary folder; the parsed response.

    A timeout, a non-zero exit or a missing response is one :class:`MoekitError` naming ``what`` (with the log's last
    line); a response ``{"error": ...}`` is returned as it is, for the caller to word."""
    with tempfile.TemporaryDirectory(prefix="moekit-worker-") as tmp:
        req, resp, log = Path(tmp) / "request.json", Path(tmp) / "response.json", Path(tmp) / "worker.log"
        req.write_text(json.dumps(request))  # not an output: the worker's request, in a private folder
        try:
            with open(log, "w") as f:  # not an output: the worker's log, in a private folder
                proc = subprocess.run([*argv, str(req), str(resp)], stdout=f, stderr=subprocess.STDOUT,
                                      timeout=timeout_s, cwd=tmp, env=env)
        except subprocess.TimeoutExpired:
            raise MoekitError(f"{what} did not finish within {timeout_s} s{hint}") from None
        text = log.read_text(errors="replace")
        if proc.returncode != 0 or not resp.exists():
            if "No module named moekit" in text or "No module named 'moekit'" in text:
                raise MoekitError(f"moekit is not installed in {what}'s environment ({argv[0]}): recreate it with "
                                  "`moekit vllm-env`, which installs moekit and lm-eval there too")
            tail = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
            raise MoekitError(f"{what} failed (exit {proc.returncode}): {tail[0][:300]}")
        return json.loads(resp.read_text())
