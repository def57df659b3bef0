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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from moekit.checkpoint.forms import checkpoint_form
from moekit.checkpoint.paths import cache_dir
from moekit.outputs import staged_dir, write_json
from moekit.serve.envs import find_python, run_step, run_worker
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
    return find_python(explicit, option="--llmc-python", env_var=ENV_VAR, default_dir=default_env_dir(),
                       what="an llm-compressor environment",
                       create=f"`moekit llmc-env` (installs {PACKAGE} into {default_env_dir()})")


def create_env(path: Path | None = None, *, cuda: bool = False, python: str = sys.executable) -> Path:
    """Create (or complete) the llm-compressor environment at ``path``; returns its Python."""
    path = Path(path) if path else default_env_dir()
    start = time.perf_counter()
    if not (path / "bin" / "python").exists():
        run_step([python, "-m", "venv", str(path)], "creating the virtual environment")
    py = path / "bin" / "python"
    if not cuda:
        run_step([str(py), "-m", "pip", "install", "-q", TORCH_CPU], f"pip install {TORCH_CPU}")
    run_step([str(py), "-m", "pip", "install", "-q", PACKAGE], f"pip install {PACKAGE}")
    run_step([str(py), "-c", "import llmcompressor"], "importing llmcompressor")
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
    with staged_dir(out, overwrite) as tmp:
        request = {"model": str(model.resolve()), "out": str(tmp), "scheme": cfg.scheme, "ignore": cfg.ignore()}
        report = run_worker([str(python), str(WORKER)], request, timeout_s=cfg.timeout_s,
                            what="the llm-compressor process", hint="; raise --timeout")
        if "error" in report:
            raise MoekitError(f"llm-compressor failed on '{model}': {report['error']}")
        if not report.get("quantized_modules"):
            raise MoekitError(f"llm-compressor quantized no module of '{model}' with scheme {cfg.scheme}; nothing written")
        report.update(scheme=cfg.scheme, experts=cfg.experts, ignore=cfg.ignore(), source=str(model))
        write_json(tmp / "moekit_quantize.json", report)
    return report
