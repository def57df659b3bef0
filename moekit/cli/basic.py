"""`moekit info` and `moekit ppl`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from moekit.cli import app
from moekit.cli.common import DEVICE, DTYPE, FIELD, MODEL, TRUST, load


@app.command()
def info(model: str = MODEL, dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
         as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    """Architecture, layers, experts per layer, top-k, shared experts and parameter counts."""
    from moekit.checkpoint.forms import checkpoint_form
    from moekit.checkpoint.load import resolve
    from moekit.core.arch import describe

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
        dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST):
    """Perplexity over fixed non-overlapping windows."""
    from moekit.eval.perplexity import perplexity, windows

    m, tok = load(model, dtype, device, trust_remote_code)
    toks = windows(tok, data, max_tokens=max_tokens, window=window, field=field)
    value = perplexity(m, toks, batch_size=batch_size)
    print(f"perplexity {value:.3f} over {toks.numel():,} tokens ({toks.shape[0]} windows of {window}) of {data}")
