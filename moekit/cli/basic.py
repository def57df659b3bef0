"""`moekit info` and `moekit ppl`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from moekit.cli import app
from moekit.cli.common import (DEVICE, DEVICE_MAP, DTYPE, FIELD, MAX_MEMORY, MODE, MODEL, OFFLOAD, TRUST, load,
                               mode_for, tokenizer_of)

@app.command()
def info(model: str = typer.Argument(None, help="local checkpoint directory, .gguf file, hub id, or 'smollm2' / "
                                            "'smollm2-moe' (not needed with --families)"),
         dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
         device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
         as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
         families: bool = typer.Option(False, "--families", help="the supported MoE families and what each command "
                                       "does with them (and whether the vLLM environment's registry has each)"),
         vllm_python: Path = typer.Option(None, "--vllm-python", envvar="MOEKIT_VLLM_PYTHON", help="python of the vLLM environment")):
    """Architecture, layers, experts per layer, top-k, shared experts, parameter counts, and the memory each way of
    running needs (with --device-map / --max-memory: what each device would hold). No weight is read."""
    from moekit.checkpoint.device_map import gib, memory_needs, parse_device_map, parse_max_memory, plan
    from moekit.checkpoint.forms import checkpoint_form
    from moekit.checkpoint.load import meta_model, resolve
    from moekit.core.arch import describe
    from moekit.core.device import pick_device, pick_dtype
    from moekit.errors import MoekitError

    if families:
        return print_families(as_json, vllm_python)
    if model is None:
        raise MoekitError("no model given: pass MODEL, or --families for the supported families")

    form = checkpoint_form(resolve(model))
    dt = pick_dtype(dtype, pick_device(device))
    m = meta_model(model, dtype=dt, trust_remote_code=trust_remote_code)
    memory = {"dtype": str(dt).removeprefix("torch."), **memory_needs(m)}
    if device_map or max_memory or offload_folder:
        memory["device_map"] = plan(m, parse_device_map(device_map) or "auto", parse_max_memory(max_memory))
    memory["unit"] = "bytes of weights (activations excluded)"
    d = {**describe(m), "form": form.line(), "memory": memory}
    if as_json:
        print(json.dumps(d, indent=2))
        return
    table = Table(title=f"moekit info: {model}", show_header=False)
    for k, v in d.items():
        if k != "memory":
            table.add_row(k, f"{v:,}" if isinstance(v, int) and k.startswith("params") else str(v))
    table.add_row(f"memory ({memory['dtype']}): load", f"{gib(memory['load'])}: every weight")
    table.add_row("memory: load + save", f"{gib(memory['load_and_save'])}: the save writes one layer at a time")
    table.add_row("memory: layer-sequential", f"{gib(memory['sequential'])}: 3 × the largest decoder layer + embeddings + lm_head")
    if "device_map" in memory:
        table.add_row("memory: device map", ", ".join(f"{dev} {gib(n)}" for dev, n in memory["device_map"].items()))
    table.add_row("memory: not counted", "activations, KV cache, gradients and optimizer state")
    Console().print(table)


@app.command()
def ppl(model: str = MODEL, data: str = typer.Option(..., "--data", help="text source (file, 'c4', 'hf:NAME', 'self')"),
        field: str = FIELD, max_tokens: int = typer.Option(65536, help="score the first N tokens"),
        window: int = typer.Option(1024, help="non-overlapping window length"),
        batch_size: int = typer.Option(4, help="windows per forward pass"),
        backend: str = typer.Option("hf", "--backend", help="hf (transformers, in process) or vllm (a saved checkpoint "
                                    "in vLLM's engine, e.g. a compressed-tensors quantization)"),
        engine: str = typer.Option(None, "--engine-args", help="with --backend vllm: more vllm.LLM arguments (JSON or key=value,...)"),
        vllm_python: Path = typer.Option(None, "--vllm-python", envvar="MOEKIT_VLLM_PYTHON", help="python of the vLLM environment"),
        dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
        device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD, mode: str = MODE):
    """Perplexity over fixed non-overlapping windows."""
    from moekit.errors import MoekitError
    from moekit.eval.perplexity import perplexity, windows

    if backend == "vllm":
        from moekit.checkpoint.load import resolve
        from moekit.checkpoint.read import read_tokenizer
        from moekit.cli.common import engine_args
        from moekit.serve.perplexity import vllm_perplexity

        path = resolve(model)
        if isinstance(path, str) or not Path(path).is_dir():
            raise MoekitError(f"--backend vllm scores a saved checkpoint directory; '{model}' is not one")
        tok = read_tokenizer(path)
        if tok is None:
            raise MoekitError(f"'{model}' has no tokenizer files: perplexity on text needs one")
        toks = windows(tok, data, max_tokens=max_tokens, window=window, field=field)
        r = vllm_perplexity(path, toks, dtype=dtype, engine=engine_args(engine), vllm_python=vllm_python)
        print(f"perplexity {r['value']:.3f} over {toks.numel():,} tokens ({toks.shape[0]} windows of {window}) of {data} "
              f"in vLLM {r['vllm_version']}")
        return
    if backend != "hf":
        raise MoekitError(f"unknown backend '{backend}': use hf (in process) or vllm (a saved checkpoint)")
    if mode_for(model, mode, device, dtype, "ppl", device_map, max_memory, offload_folder) == "sequential":
        from moekit.eval.perplexity import perplexity_sequential

        toks = windows(tokenizer_of(model, trust_remote_code), data, max_tokens=max_tokens, window=window, field=field)
        value = perplexity_sequential(model, toks, batch_size=batch_size, device=device, dtype=dtype)
    else:
        m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
        toks = windows(tok, data, max_tokens=max_tokens, window=window, field=field)
        value = perplexity(m, toks, batch_size=batch_size)
    print(f"perplexity {value:.3f} over {toks.numel():,} tokens ({toks.shape[0]} windows of {window}) of {data}")


def print_families(as_json: bool, vllm_python: Path | None) -> None:
    from moekit.core.arch import family_table
    from moekit.errors import MoekitError
    from moekit.serve.vllm_env import vllm_architectures

    rows = family_table()
    try:
        archs = vllm_architectures(vllm_python)
    except MoekitError:
        archs = None
    for row in rows:
        row["in vLLM's registry"] = "?" if archs is None else ("yes" if row["architecture"] in archs else "no")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from moekit.eval.results import format_table

    print(f"{len(rows)} supported MoE families (transformers' own model classes; the vLLM column: the vLLM "
          "environment's model registry lists the architecture)\n")
    print(format_table(list(rows[0]), [list(r.values()) for r in rows]), end="")
