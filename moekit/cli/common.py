"""Options shared by several commands, and :func:`option`: a CLI option whose default is a config field's.

A config dataclass (``PruneConfig``, ``CarveConfig`` ...) holds the one default of each setting, the Python API's;
an option that stands for a field takes its default from there, so the CLI and the API build the same model
(tests/test_cli_defaults.py checks every command).
"""

from __future__ import annotations

import dataclasses
import json

import typer

MODEL = typer.Argument(..., help="local checkpoint directory, .gguf file, hub id, or 'smollm2' / 'smollm2-moe'")
DTYPE = typer.Option("auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
DEVICE = typer.Option("auto", help="cpu, cuda, cuda:N or auto")
DEVICE_MAP = typer.Option(None, "--device-map", help="spread the model over devices (accelerate): auto, balanced, "
                          "balanced_low_0, sequential, one device, a JSON map '{\"model.layers.0\": 0, \"\": \"cpu\"}' "
                          "(devices: N or cuda:N, cpu, disk, mps) or a .json file holding one")
MAX_MEMORY = typer.Option(None, "--max-memory", help="per-device budget for the device map, e.g. '0=20GiB,cpu=60GiB' or "
                          "JSON; alone it means --device-map auto")
OFFLOAD = typer.Option(None, "--offload-folder", help="folder for the weights the device map puts on disk")
TRUST = typer.Option(False, "--trust-remote-code", help="allow the checkpoint's own Python code to run")
DATA = typer.Option(..., "--data", help="local .txt/.jsonl/.json/.parquet file, 'c4', 'hf:NAME[:CONFIG[:SPLIT]]', or 'self'")
FIELD = typer.Option("text", "--field", help="record field holding the text")
OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing non-empty output directory")
MODE = typer.Option("auto", "--mode", help="memory (load the whole model), sequential (one decoder layer at a time, "
                    "read from the checkpoint's shards and written straight to the output's: any size in the memory of "
                    "one layer; local checkpoints) or auto (sequential when the model does not fit in free memory)")


def field_default(config: type, name: str):
    """The default of field ``name`` of the dataclass ``config`` (a fresh value for a ``default_factory``)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields:
        raise KeyError(f"{config.__name__} has no field '{name}'")
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"{config.__name__}.{name} has no default: declare the option required (...)")


def option(config: type, name: str, *flags: str, **kwargs):
    """``typer.Option`` for the config field ``config.name``, defaulting to that field's default.

    The option remembers its field (``.config_field``) so tests/test_cli_defaults.py can check it.
    """
    info = typer.Option(field_default(config, name), *flags, **kwargs)
    info.config_field = (config, name)
    return info


def load(model: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False, device_map=None,
         max_memory=None, offload_folder=None):
    from moekit.checkpoint.load import load_model

    return load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, device_map=device_map,
                      max_memory=max_memory, offload_folder=offload_folder)


def mode_for(model: str, mode: str, device: str, dtype: str, command: str, *placement) -> str:
    """'memory' or 'sequential' (see :mod:`moekit.sequential.mode`); a device map or memory budget means memory."""
    from moekit.errors import MoekitError
    from moekit.sequential.mode import choose_mode

    if any(p is not None for p in placement):
        if mode == "sequential":
            raise MoekitError("--device-map / --max-memory / --offload-folder place a whole model: drop them with "
                              "--mode sequential, or use --mode memory")
        return "memory"
    return choose_mode(model, mode, device=device, dtype=dtype, command=command)


def propagating_mode(propagate: bool, mode: str, data: str | None, placement: tuple, command: str) -> str:
    """``mode`` as given, or 'sequential' for ``--propagate`` (error propagation runs on the layer-sequential engine,
    which carries the compressed layers' hidden states on to the next layer), after checking the options allow it."""
    from moekit.errors import MoekitError

    if not propagate:
        return mode
    if data is None:
        raise MoekitError(f"{command} --propagate fits each layer on calibration text: give --data")
    if mode == "memory" or any(p is not None for p in placement):
        raise MoekitError(f"{command} --propagate runs layer by layer: drop --mode memory / --device-map / "
                          "--max-memory / --offload-folder")
    return "sequential"


def tokenizer_of(model: str, trust_remote_code: bool = False):
    """The tokenizer saved beside a local checkpoint (the layer-sequential mode loads no model to take it from)."""
    from moekit.checkpoint.load import local_checkpoint
    from moekit.checkpoint.read import read_tokenizer
    from moekit.errors import MoekitError

    tok = read_tokenizer(local_checkpoint(model, purpose="--mode sequential"), trust_remote_code=trust_remote_code)
    if tok is None:
        raise MoekitError(f"'{model}' has no tokenizer files: the calibration text cannot be tokenized; save the "
                          "tokenizer beside the weights")
    return tok


def engine_args(text: str | None) -> dict:
    """``--engine-args '{"tensor_parallel_size": 2}'`` or ``key=value,key=value`` -> a dict."""
    from moekit.errors import MoekitError

    if not text:
        return {}
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise MoekitError(f"--engine-args is not valid JSON ({e.msg}): pass '{{\"key\": value}}' or key=value,...") from None
        if not isinstance(value, dict):
            raise MoekitError("--engine-args must be a JSON object")
        return value
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep or not key:
            raise MoekitError(f"--engine-args item '{part}' is not key=value")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
