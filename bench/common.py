"""Plumbing every benchmark script shares: data paths, common arguments, models, statistics, dev tasks, logs.

Data comes from ``--data-dir``, else ``$MOEKIT_DATA``, else ``../shared/data`` beside the repository (bench is
not the package, so a default relative to the repository is fine). The folder holds ``calib/`` and ``dev/``.
Results go under ``bench/results/`` by default: the small JSON and Markdown tables there are committed, the
statistics and checkpoints the scripts cache beside them are not (see ``.gitignore``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
CALIB_FILE = "calib/c4_train_head.jsonl"
DEV_FILE = "dev/c4_valid_dev.jsonl"
DEV_TASKS = ("arc_easy", "openbookqa", "social_iqa")

if str(ROOT) not in sys.path:  # run as `python bench/X.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------ arguments
def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose help is the script's docstring, kept as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common(ap: argparse.ArgumentParser, *, model: str = "smollm2-moe", limit: int | None = None,
               limit_help: str = "items per dev task", out: str | Path | None = RESULTS, out_help: str = "results folder",
               calib: bool = True, dev: bool = True) -> argparse.ArgumentParser:
    """The arguments most scripts take: --model, --data-dir (+ --calib / --dev files in it), --limit, --out.

    ``limit=None`` leaves --limit out, ``out=None`` leaves --out out; --calib and --dev default to the usual files
    under --data-dir and are resolved by :func:`parse`."""
    ap.add_argument("--model", default=model)
    ap.add_argument("--data-dir", type=Path, default=None,
                    help=f"folder with calib/ and dev/ (default: $MOEKIT_DATA, else {DEFAULT_DATA})")
    if calib:
        ap.add_argument("--calib", default=None, help=f"calibration text (default: DATA_DIR/{CALIB_FILE})")
    if dev:
        ap.add_argument("--dev", "--ppl-data", dest="dev", default=None,
                        help=f"perplexity text (default: DATA_DIR/{DEV_FILE})")
    if limit is not None:
        ap.add_argument("--limit", type=int, default=limit, help=limit_help)
    if out is not None:
        ap.add_argument("--out", default=str(out), help=out_help)
    return ap


def data_root(value: str | Path | None = None) -> Path:
    """The data folder: ``value``, else ``$MOEKIT_DATA``, else ``../shared/data`` beside the repository."""
    return Path(value or os.environ.get("MOEKIT_DATA") or DEFAULT_DATA).expanduser()


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then fill the data paths left at their defaults (--data-dir, --calib, --dev)."""
    args = ap.parse_args(argv)
    if hasattr(args, "data_dir"):
        args.data_dir = data_root(args.data_dir)
        if args.data_dir.is_dir():  # the embedded default is the one built on this folder's calibration text
            os.environ.setdefault("MOEKIT_DATA", str(args.data_dir.resolve()))
        if hasattr(args, "calib") and args.calib is None:
            args.calib = str(args.data_dir / CALIB_FILE)
        if hasattr(args, "dev") and args.dev is None:
            args.dev = str(args.data_dir / DEV_FILE)
    return args


def tasks_dir(args: argparse.Namespace) -> Path:
    """The folder with the offline dev-task files."""
    return Path(args.data_dir) / "dev"


# ------------------------------------------------------------------------------------------------ models and statistics
def load(name: str, **kw):
    """``moekit.load_model`` in fp32 on the CPU, the setting of every measurement in bench/README.md."""
    from moekit.checkpoint.load import load_model

    return load_model(name, dtype="float32", device="cpu", **kw)


def profile_tokens(model, tokens, cfg=None):
    """One profile pass (``moekit.profile.profile.profile``) with ``cfg`` or the default ProfileConfig."""
    from moekit.profile.profile import ProfileConfig, profile

    return profile(model, cfg or ProfileConfig(), tokens=tokens)


def load_or_profile(model, tokens, path: str | Path | None = None, cfg=None):
    """The statistics cached at ``path`` when they were made for ``model``; else profile ``tokens`` and save them
    there. ``path=None`` profiles without caching."""
    from moekit.profile.stats import ExpertStats, fingerprint

    if path is not None and Path(path).exists():
        stats = ExpertStats.load(path)
        if stats.meta.get("fingerprint") == fingerprint(model):
            return stats
        print(f"{path} is for another model; profiling again", flush=True)
    stats = profile_tokens(model, tokens, cfg)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    return stats


# ------------------------------------------------------------------------------------------------ dev tasks
def dev_tasks(model, tok, tasks, data_dir: str | Path, limit: int, batch_size: int = 16) -> dict:
    """Zero-shot accuracy on the first ``limit`` items of each offline dev task (``moekit.eval.harness.evaluate``)."""
    from moekit.eval.harness import evaluate

    return evaluate(model, tok, tasks=list(tasks), data_dir=str(data_dir), limit=limit, batch_size=batch_size)


def dev_accuracy(model, tok, tasks, data_dir: str | Path, limit: int, batch_size: int = 16) -> dict[str, float]:
    """Each task's summary metric (acc_norm for ARC and OpenBookQA, acc for social_iqa) by task name."""
    res = dev_tasks(model, tok, tasks, data_dir, limit, batch_size)
    return {t: res["tasks"][t]["summary"] for t in tasks}


def mean(values) -> float | None:
    values = list(values.values() if isinstance(values, dict) else values)
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------ result logs
def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record to a JSON-lines log (rows are saved as they finish, so a partial run is usable)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=indent, default=str)
    os.replace(tmp, path)
