"""`moekit info` and `moekit ppl`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from moekit.cli import app
from moekit.cli.common import DEVICE, DTYPE, FIELD, MODEL, TRUST, load


@app.command()
def info(model: str = typer.Argument(None, help="local checkpoint directory, .gguf file, hub id, or 'smollm2' / "
                                            "'smollm2-moe' (not needed with --families)"),
         dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
         as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
         families: bool = typer.Option(False, "--families", help="the supported MoE families and what each command "
                                       "does with them (and whether the vLLM environment's registry has each)"),
         vllm_python: Path = typer.Option(None, "--vllm-python", envvar="MOEKIT_VLLM_PYTHON", help="python of the vLLM environment")):
    """Architecture, layers, experts per layer, top-k, shared experts and parameter counts."""
    from moekit.checkpoint.forms import checkpoint_form
    from moekit.checkpoint.load import resolve
    from moekit.core.arch import describe
    from moekit.errors import MoekitError

    if families:
        return print_families(as_json, vllm_python)
    if model is None:
        raise MoekitError("no model given: pass MODEL, or --families for the supported families")

    form = checkpoint_form(resolve(model))
    m, _ = load(model, dtype, device, trust_remote_code)
    d = {**describe(m), "form": form.line()}
    if as_json:
        print(json.dumps(d, indent=2))
        return
    table = Table(title=f"moekit info: {model}", show_header=False)
    for k, v in d.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) and k.startswith("params") else str(v))
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
        dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST):
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
    m, tok = load(model, dtype, device, trust_remote_code)
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
