"""``moekit quantize``: hand a moekit output to llm-compressor for a quantized checkpoint vLLM serves.

llm-compressor (0.14) pins transformers <= 5.17, so like vLLM it runs in its own virtual environment
(``moekit llmc-env`` creates it; ``--llmc-python`` / ``$MOEKIT_LLMC_PYTHON`` point at another) and
:mod:`moekit.serve.llmc_worker` runs there. moekit's part: refuse a form the quantizer would misread (moekit's own
non-uniform form, the old Qwen2-MoE form), choose what stays unquantized, and write the result atomically.

What stays in full precision: ``lm_head`` and the routers (``*.gate``, ``*.shared_expert_gate``): their outputs
pick the experts, and int8 noise there changes which experts run. The routed experts are quantized unless
``experts=False``. vLLM 0.32 on CPU has quantized fused-MoE kernels only for AMX CPUs (int4 W4A16 and FP8
W8A16; its int8 W8A8 MoE has no CPU kernel at all); without AMX, quantize the attention and shared-expert
projections only (``experts=False``) and the experts stay in the checkpoint's dtype. On CUDA all three
schemes run with experts quantized.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moekit.checkpoint.forms import checkpoint_form
from moekit.checkpoint.paths import cache_dir
from moekit.outputs import staged_dir, write_json
from moekit.errors import MoekitError

WORKER = Path(__file__).with_name("llmc_worker.py")
ENV_VAR = "MOEKIT_LLMC_PYTHON"
PACKAGE = "llmcompressor==0.14.0.1"  # the version moekit is tested with
TORCH_CPU = "torch==2.13.0"  # on CPU machines: the local CPU wheel (an unpinned torch pulls CUDA wheels)
SCHEMES = ("W8A8", "FP8_DYNAMIC", "W4A16", "W8A16", "FP8")
ROUTERS = ("lm_head", r"re:.*\.gate$", r"re:.*shared_expert_gate$")
EXPERTS = r"re:.*\.experts\..*"


@dataclass
class QuantizeConfig:
    scheme: str = "W8A8"  # llm-compressor preset: int8 weights per channel, int8 activations per token
    experts: bool = True  # also the routed experts (vLLM on CPU without AMX cannot run them quantized)
    timeout_s: int = 3600

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise MoekitError(f"scheme '{self.scheme}' is not one of {', '.join(SCHEMES)}")
        if self.timeout_s < 1:
            raise MoekitError(f"timeout {self.timeout_s} must be at least 1 second")

    def ignore(self) -> list[str]:
        return [*ROUTERS, *(() if self.experts else (EXPERTS,))]


def default_env_dir() -> Path:
    return cache_dir() / "llmc-env"


def find_llmc_python(explicit: str | Path | None = None) -> Path:
    """The Python of the llm-compressor environment, or a one-line error saying how to make one."""
    for candidate, origin in ((explicit, "--llmc-python"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise MoekitError(f"{origin} '{candidate}' is not a file: point it at the python of an llm-compressor environment")
            return path
    path = default_env_dir() / "bin" / "python"
    if path.is_file():
        return path
    raise MoekitError(f"no llm-compressor environment: create one with `moekit llmc-env` (installs {PACKAGE} into "
                      f"{default_env_dir()}), or pass --llmc-python / set {ENV_VAR}")


def create_env(path: Path | None = None, *, cuda: bool = False, python: str = sys.executable) -> Path:
    """Create (or complete) the llm-compressor environment at ``path``; returns its Python."""
    from moekit.serve.vllm_env import _run

    path = Path(path) if path else default_env_dir()
    start = time.perf_counter()
    if not (path / "bin" / "python").exists():
        _run([python, "-m", "venv", str(path)], "creating the virtual environment")
    py = path / "bin" / "python"
    if not cuda:
        _run([str(py), "-m", "pip", "install", "-q", TORCH_CPU], f"pip install {TORCH_CPU}")
    _run([str(py), "-m", "pip", "install", "-q", PACKAGE], f"pip install {PACKAGE}")
    _run([str(py), "-c", "import llmcompressor"], "importing llmcompressor")
    print(f"moekit: llm-compressor ready in {path} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return py


def quantize(model: str | Path, out: str | Path, cfg: QuantizeConfig | None = None, *, overwrite: bool = False,
             llmc_python: str | Path | None = None) -> dict:
    """Quantize the checkpoint directory ``model`` into ``out`` (compressed-tensors); the worker's report."""
    cfg = cfg or QuantizeConfig()
    cfg.validate()
    model = Path(model)
    form = checkpoint_form(model)
    if not form.servable:
        raise MoekitError(f"'{model}' is in the {form.name} form, which llm-compressor would misread ({form.reason}): {form.fix}")
    if json.loads((model / "config.json").read_text()).get("quantization_config"):
        raise MoekitError(f"'{model}' is already quantized: quantize the unquantized checkpoint it came from")
    python = find_llmc_python(llmc_python)
    with staged_dir(out, overwrite) as tmp, tempfile.TemporaryDirectory(prefix="moekit-quantize-") as work:
        req, resp, log = Path(work) / "request.json", Path(work) / "response.json", Path(work) / "llmc.log"
        request = {"model": str(model.resolve()), "out": str(tmp), "scheme": cfg.scheme, "ignore": cfg.ignore()}
        req.write_text(json.dumps(request))  # not an output: the worker's request, in a private folder
        try:
            with open(log, "w") as f:  # not an output: the worker's log, in a private folder
                proc = subprocess.run([str(python), str(WORKER), str(req), str(resp)], stdout=f, stderr=subprocess.STDOUT,
                                      timeout=cfg.timeout_s, cwd=work)
        except subprocess.TimeoutExpired:
            raise MoekitError(f"llm-compressor did not finish within {cfg.timeout_s} s; raise --timeout") from None
        if proc.returncode != 0 or not resp.exists():
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["no output"]
            raise MoekitError(f"the llm-compressor process failed (exit {proc.returncode}): {tail[0][:300]}")
        report = json.loads(resp.read_text())
        if "error" in report:
            raise MoekitError(f"llm-compressor failed on '{model}': {report['error']}")
        if not report.get("quantized_modules"):
            raise MoekitError(f"llm-compressor quantized no module of '{model}' with scheme {cfg.scheme}; nothing written")
        report.update(scheme=cfg.scheme, experts=cfg.experts, ignore=cfg.ignore(), source=str(model))
        write_json(tmp / "moekit_quantize.json", report)
    return report
