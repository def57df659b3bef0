"""Every command's inputs, checked in one place before any work starts.

:func:`checked` wraps each command (``moekit/cli/__init__.py`` applies it to all of them): before the command's
body runs, :func:`check_inputs` looks at its arguments by name. A name means the same thing in every command:

* numbers (``--window``, ``--batch-size``, ``--seq-len``, ``--limit``, ``--ratio`` ...): the allowed range in
  :data:`AT_LEAST` / :data:`FLOAT_RANGES`;
* inputs (``MODEL``, ``--teacher``, ``--stats``, ``--data``, ``--recipe`` ...): they exist, are the right kind of
  thing, and a checkpoint's ``config.json`` parses and asks for no remote code unless ``--trust-remote-code``;
* outputs (``--out``, ``--plot``, ``--json``): not the current directory or an input, not a dangling link, not
  existing unless ``--overwrite``, inside a folder this user can write, with free space for the expected size;
* ``--device`` and ``--dtype``: a device this machine has, a dtype moekit runs;
* ``--device-map``, ``--max-memory``, ``--offload-folder``: they parse, name devices this machine has, and (on the
  model built on the meta device, no weights read) modules the model has, with a budget that holds a decoder layer.

What can only be known after loading (``--target`` against a model's expert count, statistics against its
shapes) is checked where it is used, with the same kind of one-line :class:`~moekit.errors.MoekitError`.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import shutil
from pathlib import Path

from typer.models import ArgumentInfo, OptionInfo

from moekit.errors import MoekitError

AT_LEAST = {  # integer options: the smallest value that means something
    "active": 1, "batch_size": 1, "checkpoint_every": 0, "distill_steps": 0, "experts": 1, "finetune_steps": 0,
    "gram": 0, "heldout": 0, "iterations": 1, "k_a": 1, "keep": 1, "limit": 1, "local_epochs": 0, "max_cluster": 1,
    "max_model_len": 2, "max_tokens": 1, "merges_per_layer": 0, "n_seq": 1, "num_fewshot": 0, "ppl_tokens": 1,
    "ppl_window": 2, "prompts": 1, "random_n": 1, "rank": 1, "seed": 0, "seq_len": 2, "shared": 0, "steps": 1,
    "target": 1, "target_total": 1, "timeout": 1, "top_k_prime": 1, "warmup": 0, "window": 2,
}
FLOAT_RANGES = {  # float options: (low, high, low inclusive, high inclusive)
    "ratio": (0.0, 1.0, False, False), "lr": (0.0, math.inf, False, False), "tau": (0.0, math.inf, False, False),
    "atol": (0.0, math.inf, False, False), "gpu_memory_utilization": (0.0, 1.0, False, True),
    "threshold": (0.0, 1.0, False, True), "top_k": (0.0, math.inf, False, False),
}
MODEL_INPUTS = ("model", "teacher", "student", "baseline")  # checkpoint directories, .gguf files, hub ids, embedded names
FILE_INPUTS = ("stats", "stats_file", "recipe")  # files that must exist
DATA_INPUTS = ("data", "ppl_data")  # text sources: a file, or 'c4' / 'self' / 'hf:NAME'
DIR_INPUTS = ("data_dir",)
PYTHONS = ("vllm_python", "llmc_python")  # the interpreters of the client environments
LIST_INPUTS = {"results": "file", "checkpoints": "dir"}
OUTPUTS = ("out", "plot", "plots", "json_out")
FOLDERS = ("offload_folder",)  # scratch folders a command writes into (they may exist and hold files)
RESUMING = ("run", "demo")  # commands whose --out is a run folder they continue
MODEL_WRITERS = ("carve", "heal", "densify", "distill", "distill-router", "merge", "prune", "route", "uniform", "convert", "quantize")
DATA_NAMES = ("c4", "self")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
WEIGHT_SUFFIXES = (".safetensors", ".st", ".gguf")


def checked(command):
    """``command`` with :func:`check_inputs` run on its arguments before its body."""
    signature = inspect.signature(command)
    flags = {name: (name.upper() if isinstance(p.default, ArgumentInfo) else
                    next((d.split("/")[0] for d in p.default.param_decls or () if d.startswith("--")), None))
             for name, p in signature.parameters.items() if isinstance(p.default, ArgumentInfo | OptionInfo)}

    @functools.wraps(command)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        check_inputs(command.__name__.removesuffix("_cmd").replace("_", "-"), bound.arguments, flags)
        return command(*args, **kwargs)

    return run


def check_inputs(command: str, args: dict, flags: dict[str, str | None] | None = None) -> None:
    """Raise one :class:`MoekitError` for the first argument that cannot work (see the module doc). ``flags``:
    the option each argument was given as (by default ``--name-with-dashes``)."""

    def flag(name: str) -> str:
        return (flags or {}).get(name) or "--" + name.replace("_", "-").removesuffix("-")

    for name, value in args.items():
        if value is None or isinstance(value, bool):
            continue
        if name in AT_LEAST and isinstance(value, int) and value < AT_LEAST[name]:
            raise MoekitError(f"{flag(name)} {value} must be at least {AT_LEAST[name]}")
        if isinstance(value, float):
            check_float(flag(name), name, value)
    if args.get("dtype") is not None and args["dtype"] not in DTYPES:
        raise MoekitError(f"unknown dtype '{args['dtype']}': use float32, bfloat16, float16 or auto")
    if args.get("device") is not None:
        check_device(args["device"])
    trust = bool(args.get("trust_remote_code"))
    inputs: list[Path] = []
    for name in MODEL_INPUTS:
        if isinstance(args.get(name), str | Path):
            path = check_model_input(args[name], trust, flag(name))
            if path is not None:
                inputs.append(path)
    for name in FILE_INPUTS:
        if args.get(name) is not None:
            inputs.append(check_file(args[name], flag(name)))
    for name in PYTHONS:
        if args.get(name) is not None:
            check_file(args[name], flag(name))
    for name in DATA_INPUTS:
        if args.get(name) is not None:
            check_data(str(args[name]), flag(name))
    for name in DIR_INPUTS:
        if args.get(name) is not None and not Path(args[name]).expanduser().is_dir():
            raise MoekitError(f"{flag(name)} '{args[name]}' is not a directory")
    for name, kind in LIST_INPUTS.items():
        for item in args.get(name) or ():
            check_file(item, name.upper()) if kind == "file" else check_dir(item, name.upper())
    for name in FOLDERS:
        if args.get(name) is not None:
            if Path(args[name]).expanduser().is_file():
                raise MoekitError(f"{flag(name)} '{args[name]}' is a file: pass a folder")
            check_output(Path(args[name]), flag(name), overwrite=True, inputs=inputs, must_be_new=False)
    check_placement(args)
    expected = sum(weights_size(p) for p in inputs[:1])
    for name in OUTPUTS:
        if args.get(name) is not None:
            check_output(Path(args[name]), flag(name), overwrite=bool(args.get("overwrite")), inputs=inputs,
                         must_be_new=(command not in RESUMING and not args.get("resume")) or name != "out",
                         resumable="resume" in args and name == "out",
                         expected_bytes=expected if name == "out" and command in MODEL_WRITERS else 0)


def check_float(option: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise MoekitError(f"{option} {value} is not a finite number")
    if name not in FLOAT_RANGES:
        return
    lo, hi, lo_in, hi_in = FLOAT_RANGES[name]
    if (value < lo or (value == lo and not lo_in)) or (value > hi or (value == hi and not hi_in)):
        low = f"{'≥' if lo_in else '>'} {lo:g}"
        high = "" if hi == math.inf else f" and {'≤' if hi_in else '<'} {hi:g}"
        raise MoekitError(f"{option} {value:g} must be {low}{high}")


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise MoekitError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto")
    import torch

    if not torch.cuda.is_available():
        raise MoekitError(f"--device {device}: this machine has no CUDA device visible to torch; use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= count:
        raise MoekitError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def check_placement(args: dict) -> None:
    """``--device-map`` / ``--max-memory`` / ``--offload-folder`` (:mod:`moekit.checkpoint.device_map`); what needs
    the model is checked on its meta-device build."""
    from moekit.checkpoint.device_map import check_fits, parse_device_map, parse_max_memory

    device_map, max_memory = parse_device_map(args.get("device_map")), parse_max_memory(args.get("max_memory"))
    if device_map is not None and args.get("device") not in (None, "auto"):
        raise MoekitError(f"--device {args['device']} and --device-map both place the model: pass one of them")
    model = next((args[n] for n in MODEL_INPUTS if isinstance(args.get(n), str | Path)), None)
    if model is not None and (isinstance(device_map, dict) or max_memory):
        from moekit.checkpoint.load import meta_model
        from moekit.core.device import pick_device, pick_dtype

        dtype = pick_dtype(args.get("dtype"), pick_device(args.get("device")))
        meta = meta_model(str(model), dtype=dtype, trust_remote_code=bool(args.get("trust_remote_code")))
        check_fits(meta, device_map, max_memory, args.get("offload_folder"))


def check_model_input(value, trust_remote_code: bool, what: str) -> Path | None:
    """A checkpoint argument: an embedded name, an existing directory or .gguf file (whose config parses), or a
    hub id. Returns the local path, if there is one."""
    from moekit.checkpoint.load import EMBEDDED, _looks_like_hub_id

    name = str(value)
    if name in EMBEDDED:
        return None
    path = Path(name).expanduser()
    if path.is_symlink() and not path.exists():
        raise MoekitError(f"{what} '{name}' is a dangling symbolic link: point it at an existing checkpoint")
    if not path.exists():
        if _looks_like_hub_id(name) and not name.endswith(WEIGHT_SUFFIXES):
            return None
        raise MoekitError(f"{what} '{name}' does not exist: give an existing directory, a .gguf file, a hub id, "
                          "or 'smollm2' / 'smollm2-moe'")
    if path.is_file():
        if name.endswith(".gguf"):
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise MoekitError(f"{what} '{name}' is not a GGUF file (no GGUF header): re-download or re-convert it")
            return path
        raise MoekitError(f"{what} '{name}' is a file: pass the checkpoint directory (or a .gguf file)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise MoekitError(f"{what} '{name}' is not readable by this user")
    cfg = path / "config.json"
    if cfg.is_file():
        config = read_json(cfg, "config.json")
        if not isinstance(config, dict):
            raise MoekitError(f"'{cfg}' is not a JSON object: re-save the checkpoint")
        check_config(config, cfg, trust_remote_code)
    return path


def check_config(config: dict, where: Path, trust_remote_code: bool) -> None:
    """Refuse, by name, a checkpoint whose architecture would need its own Python code."""
    model_type = config.get("model_type")
    if config.get("auto_map") and not trust_remote_code:
        raise MoekitError(f"'{where}' names its own Python code (auto_map, model_type '{model_type}'); moekit does not run "
                          "it unless you pass --trust-remote-code for a checkpoint you trust")
    if not trust_remote_code:
        from transformers import CONFIG_MAPPING

        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise MoekitError(f"'{where}': model_type {model_type!r} is not an architecture transformers knows; "
                              "update transformers, or pass --trust-remote-code if the checkpoint ships its own code")


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MoekitError(f"'{path}' is not UTF-8 text: it is not a valid {what}") from None
    except json.JSONDecodeError as e:
        raise MoekitError(f"'{path}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): fix or "
                          f"re-create the {what}") from None


def check_file(value, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise MoekitError(f"{what} '{value}' does not exist" + (" (a dangling symbolic link)" if path.is_symlink() else ""))
    if path.is_dir():
        raise MoekitError(f"{what} '{value}' is a directory: pass a file")
    if not os.access(path, os.R_OK):
        raise MoekitError(f"{what} '{value}' is not readable by this user")
    return path


def check_dir(value, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise MoekitError(f"{what} '{value}' is not a directory")
    return path


def check_data(value: str, what: str) -> None:
    if value in DATA_NAMES or value.startswith("hf:"):
        return
    path = check_file(value, what)
    if path.stat().st_size == 0:
        raise MoekitError(f"{what} '{value}' is empty: give a file with text in it")
    if path.suffix in TEXT_SUFFIXES:  # the first 64 KiB decode as UTF-8 (a binary file fails here, before any work)
        import codecs

        with open(path, "rb") as f:
            head = f.read(1 << 16)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as e:
            raise MoekitError(f"{what} '{value}' is not UTF-8 text (undecodable byte at offset {e.start}): "
                              "give a text file (.txt, .jsonl, .json) in UTF-8") from None


def weights_size(path: Path) -> int:
    """Bytes of the weight files at ``path`` (a checkpoint directory or a file)."""
    if path.is_file():
        return path.stat().st_size if path.name.endswith(WEIGHT_SUFFIXES) else 0
    return sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


def check_output(out: Path, what: str, *, overwrite: bool, inputs: list[Path] = (), must_be_new: bool = True,
                 expected_bytes: int = 0, resumable: bool = False) -> None:
    """An output path that can be written whole (see the module doc)."""
    path = out.expanduser()
    if path.is_symlink() and not path.exists():
        raise MoekitError(f"{what} '{out}' is a dangling symbolic link: remove it or choose another path")
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise MoekitError(f"{what} '{out}' is the current directory (or holds it): name a new folder, e.g. {what} result")
    for inp in inputs:
        if resolved == inp.resolve() or resolved in inp.resolve().parents:
            raise MoekitError(f"{what} '{out}' would replace the input '{inp}': choose another path")
    if must_be_new and path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        how = "--resume to continue it, --overwrite to replace it" if resumable else "--overwrite to replace it"
        raise MoekitError(f"{what} '{out}' already exists: pass {how}, or choose another path")
    folder = resolved.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise MoekitError(f"{what} '{out}': '{folder}' is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MoekitError(f"{what} '{out}': the folder '{folder}' is not writable by this user (read-only or another "
                          "user's): choose another path")
    if expected_bytes:
        free = shutil.disk_usage(folder).free
        if free < expected_bytes:
            raise MoekitError(f"{what} '{out}' needs about {expected_bytes / 2**30:.2f} GiB and '{folder}' has "
                              f"{free / 2**30:.2f} GiB free: free space or choose another disk")
