"""Options shared by several commands."""

from __future__ import annotations

import typer

MODEL = typer.Argument(..., help="local checkpoint directory, .gguf file, hub id, or 'smollm2' / 'smollm2-moe'")
DTYPE = typer.Option("auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
DEVICE = typer.Option("auto", help="cpu, cuda, cuda:N or auto")
TRUST = typer.Option(False, "--trust-remote-code", help="allow the checkpoint's own Python code to run")
DATA = typer.Option(..., "--data", help="local .txt/.jsonl/.json/.parquet file, 'c4', 'hf:NAME[:CONFIG[:SPLIT]]', or 'self'")
FIELD = typer.Option("text", "--field", help="record field holding the text")
OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing non-empty output directory")


def load(model: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    from moekit.checkpoint.load import load_model

    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
