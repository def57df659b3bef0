"""The harness's ``custom_dataset`` hook for moekit's offline task configs: a local JSON-lines file.

The harness calls :func:`load` with the task's metadata (``moekit_data_dir``, ``moekit_files``: set by
:func:`moekit.evaluate.evaluate` or ``lm_eval --metadata``) and the config's ``dataset_kwargs`` (``task``,
``file``, ``split`` and for per-subject tasks ``subject`` / ``subject_field``). It returns a
``DatasetDict`` holding that one split, with the records exactly as the file has them.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from moekit.errors import MoekitError

DATA_DIR_ENV = "MOEKIT_DATA_DIR"


def resolve_file(task: str, file: str, moekit_data_dir: str | None = None, moekit_files: dict | None = None) -> Path:
    """Where the local copy of ``task`` is: an explicit task -> file mapping, else ``data_dir/file``."""
    if moekit_files and task in moekit_files:
        path = Path(moekit_files[task]).expanduser()
    else:
        data_dir = moekit_data_dir or os.environ.get(DATA_DIR_ENV)
        if not data_dir:
            raise MoekitError(f"no local data directory for task '{task}': pass --data-dir DIR "
                              f"(or the harness's --metadata '{{\"moekit_data_dir\": \"DIR\"}}')")
        path = Path(data_dir).expanduser() / file
    if not path.is_file():
        raise MoekitError(f"local data for task '{task}' not found: '{path}' does not exist "
                          f"(expected a JSON-lines file with the Hugging Face dataset's fields)")
    return path.resolve()


def read_records(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Every record of a .jsonl file (or a .json list); a malformed one names the file and its line."""
    return list(_read_cached(str(path), path.stat().st_mtime_ns, tuple(required)))


@lru_cache(maxsize=16)
def _read_cached(path: str, _mtime: int, required: tuple[str, ...]) -> tuple[dict, ...]:
    if path.endswith(".json"):
        try:
            records = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise MoekitError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise MoekitError(f"{path}: expected a JSON list of records")
        numbered = list(enumerate(records, 1))
    else:
        numbered = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    numbered.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise MoekitError(f"{path}: line {lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
    if not numbered:
        raise MoekitError(f"{path}: no records")
    for lineno, rec in numbered:
        if not isinstance(rec, dict):
            raise MoekitError(f"{path}: line {lineno}: a record must be a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise MoekitError(f"{path}: line {lineno}: record lacks field(s) {', '.join(missing)} "
                              f"(needs {', '.join(required)})")
    return tuple(rec for _, rec in numbered)


def load(task: str, file: str, split: str, subject: str | None = None, subject_field: str | None = None,
         moekit_data_dir: str | None = None, moekit_files: dict | None = None, **_ignored):
    """``custom_dataset`` for the harness: ``DatasetDict({split: records})`` from the local file."""
    import datasets

    from moekit.eval.tasks import TASKS

    spec = TASKS.get(task)
    path = resolve_file(task, file, moekit_data_dir, moekit_files)
    records = read_records(path, spec.required if spec else ())
    if subject is not None:  # per-subject task: its records (names compared case- and separator-insensitively)
        want = _norm(subject)
        records = [r for r in records if _norm(r.get(subject_field or "subject")) == want]
        if not records:
            # an empty subject would crash the harness; one record per subject is the least a file can hold
            raise MoekitError(f"{path}: no record has {subject_field or 'subject'} = '{subject}'")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def _norm(name) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")
