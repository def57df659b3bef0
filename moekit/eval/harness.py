"""Score a model on lm-evaluation-harness tasks in process: the harness's tasks, prompts and metrics.

``evaluate(model, tokenizer, tasks=...)`` hands the in-memory model to the harness's HF wrapper (so a model
compressed in this process is scored without being saved), through :class:`moekit.harness_lm.ReuseContextLM`,
which runs a question's shared context once. With ``data_dir`` the tasks read local JSON-lines copies (records
with the Hugging Face dataset's fields) through the configs in ``moekit/tasks``; without it the hub datasets.

The result is a plain dict with a stable schema (``SCHEMA``, described in :mod:`moekit.eval.results`),
written by :func:`write_result` as JSON plus a Markdown table.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from datetime import datetime, UTC
from functools import lru_cache
from pathlib import Path

from moekit.checkpoint.paths import data_dir
from moekit.errors import MoekitError
from moekit.eval.results import SCHEMA, fmt, format_table, millions
from moekit.outputs import write_json, write_text
from moekit.eval.tasks import DEV_TASKS, KNOWN_TASKS, TASKS, TASKS_DIR, summary_metric

METRICS = ("acc", "acc_norm")

__all__ = ["DEV_TASKS", "KNOWN_TASKS", "SCHEMA", "dev_data_dir", "evaluate", "evaluate_checkpoint", "markdown_table",
           "write_result"]


def dev_data_dir() -> Path | None:
    """``$MOEKIT_DATA/dev`` (the offline copies of the dev tasks), or None when ``MOEKIT_DATA`` is unset."""
    root = data_dir()
    return root / "dev" if root is not None and (root / "dev").is_dir() else None


@lru_cache(maxsize=2)
def _task_index(full: bool = False):
    """The harness's task index plus moekit's offline configs, built once.

    By default only the harness folders of the known tasks are read (a second or two); ``full`` reads all of
    the harness's several thousand YAML files, for any other harness task name.
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if full:
        return TaskManager(include_path=str(TASKS_DIR))
    root = Path(lm_eval.tasks.__file__).parent
    dirs = sorted({str(root / spec.harness_dir) for spec in TASKS.values()})
    return TaskManager(include_path=[*dirs, str(TASKS_DIR)], include_defaults=False)


def task_manager(metadata: dict, full: bool = False):
    """A task manager over the cached index whose tasks receive ``metadata`` (the local data location)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    base = _task_index(full)
    if not hasattr(base, "_factory"):  # a harness whose internals moved: build afresh (slower, same result)
        return TaskManager(include_path=base.include_path, include_defaults=full, metadata=metadata)
    tm = copy.copy(base)
    tm._factory = TaskFactory(meta=metadata)
    return tm


def check_tasks(tasks, data_dir=None, data_files: dict | None = None) -> list[str]:
    """Validate task names (and that their local files exist) before any model work."""
    from moekit.eval.tasks.local_data import read_records, resolve_file

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [t.strip() for t in tasks]
    if not tasks:
        raise MoekitError(f"no tasks given: choose from {', '.join(KNOWN_TASKS)}")
    local = data_dir is not None or bool(data_files)
    for t in tasks:
        if t not in TASKS and (local or t not in _task_index(full=True).all_tasks):
            where = " with local data" if local else ""
            raise MoekitError(f"unknown task '{t}'{where}: known tasks are {', '.join(KNOWN_TASKS)}")
        if local:  # the file exists and every record parses and has the fields the prompt reads
            path = resolve_file(t, TASKS[t].file, str(data_dir) if data_dir else None, data_files)
            read_records(path, TASKS[t].required)
    return tasks


def evaluate(model, tokenizer, tasks=DEV_TASKS, data_dir=None, limit: int | float | None = None, batch_size: int = 16,
             num_fewshot: int = 0, *, data_files: dict | None = None, reuse_context: bool = True,
             model_name: str | None = None, verbose: bool = False) -> dict:
    """Run the harness on ``model`` in process; return the result dict (schema in :mod:`moekit.eval.results`).

    ``data_dir``: a folder with the local copies (``arc_easy.jsonl`` ...); ``data_files``: task -> file, overriding
    it per task. Neither: the hub datasets. ``limit``: the first N items of each task (the harness's ``--limit``).
    """
    from moekit.eval.harness_lm import ReuseContextLM

    if tokenizer is None:
        raise MoekitError("the model has no tokenizer: load it with its tokenizer (save the tokenizer files beside the weights)")
    tasks = check_tasks(tasks, data_dir, data_files)
    metadata = _metadata(data_dir, data_files)
    was_training = model.training
    model.eval()
    try:
        with _quiet_harness(verbose):
            lm = ReuseContextLM(model, tokenizer, batch_size=batch_size, reuse_context=reuse_context)
            result = _run(lm, tasks, metadata, limit=limit, num_fewshot=num_fewshot)
    finally:
        model.train(was_training)
    result["model"] = model_info(model, model_name)
    result["settings"].update(batch_size=batch_size, reuse_context=reuse_context, backend="hf")
    return result


def evaluate_checkpoint(path: str, tasks=DEV_TASKS, data_dir=None, limit: int | float | None = None,
                        batch_size: int | str = "auto", num_fewshot: int = 0, *, backend: str = "vllm",
                        data_files: dict | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                        model_args: dict | None = None, vllm_python: str | None = None) -> dict:
    """A saved checkpoint through one of the harness's own backends (``vllm`` on GPU machines): a pass-through.

    Same tasks, offline configs and result schema as :func:`evaluate`; the model never enters this process, so
    ``model.fingerprint`` is None and the parameter counts come from the config (built on the meta device).
    ``model_args`` go to the backend as they are (vLLM: tensor_parallel_size, gpu_memory_utilization,
    max_model_len, ...). Where this environment has no vLLM, the job runs in the vLLM environment
    (:mod:`moekit.serve.remote_eval`; ``vllm_python`` as for ``moekit serve-check``).
    """
    import importlib.util

    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        # vLLM lives in its own environment (it pins torch and transformers): run there, same code and schema
        from moekit.serve.remote_eval import evaluate_in_vllm_env
        from moekit.serve.vllm_env import find_vllm_python

        python = find_vllm_python(vllm_python)
        kwargs = {"path": str(Path(path).resolve()), "tasks": list(tasks),
                  "data_dir": None if data_dir is None else str(Path(data_dir).resolve()), "limit": limit,
                  "batch_size": batch_size, "num_fewshot": num_fewshot, "dtype": dtype,
                  "trust_remote_code": trust_remote_code, "model_args": model_args,
                  "data_files": {k: str(Path(v).resolve()) for k, v in (data_files or {}).items()} or None}
        return evaluate_in_vllm_env(python, kwargs)
    tasks = check_tasks(tasks, data_dir, data_files)
    metadata = _metadata(data_dir, data_files)
    args = {"pretrained": str(path), "dtype": dtype, "trust_remote_code": trust_remote_code, **(model_args or {})}
    with _quiet_harness(False):
        result = _run(backend, tasks, metadata, limit=limit, num_fewshot=num_fewshot, model_args=args,
                      batch_size=batch_size)
    result["model"] = _checkpoint_info(path, trust_remote_code)
    result["settings"].update(batch_size=batch_size, reuse_context=False, backend=backend)
    return result


def _metadata(data_dir, data_files) -> dict:
    metadata = {}
    if data_dir is not None:
        metadata["moekit_data_dir"] = str(Path(data_dir).expanduser().resolve())
    if data_files:
        metadata["moekit_files"] = {k: str(Path(v).expanduser().resolve()) for k, v in data_files.items()}
    return metadata


def _run(lm, tasks: list[str], metadata: dict, *, limit, num_fewshot, **harness_kw) -> dict:
    """simple_evaluate on ``lm`` (an LM object or a harness backend name); the result without the model part."""
    from lm_eval import evaluator

    local = bool(metadata)
    names = [_harness_name(t, local) for t in tasks]
    start = time.perf_counter()
    try:
        out = evaluator.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                        task_manager=task_manager(metadata, full=not set(tasks) <= set(TASKS)),
                                        log_samples=False, **harness_kw)
    except OSError as e:  # datasets' ConnectionError / DatasetNotFoundError are OSErrors
        if local:
            raise
        raise MoekitError(f"cannot load the task data from the hub ({str(e).splitlines()[0][:160]}): go online, "
                          "or pass --data-dir / data_dir with local copies (e.g. ../shared/data/dev)") from None
    seconds = time.perf_counter() - start
    return {
        "schema": SCHEMA,
        "moekit_version": _moekit_version(),
        "harness_version": _harness_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": None,
        "tasks": {t: _task_metrics(t, n, out) for t, n in zip(tasks, names, strict=True)},
        "data": {t: _data_info(t, local, metadata) for t in tasks},
        "settings": {"limit": limit, "num_fewshot": num_fewshot, "data_dir": metadata.get("moekit_data_dir"),
                     "data_files": metadata.get("moekit_files")},
        "costs": None,
        "perplexity": None,
        "seconds": round(seconds, 2),
    }


def _checkpoint_info(path: str, trust_remote_code: bool) -> dict:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekit.core.arch import model_type, param_counts

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {"name": str(path), "fingerprint": None, "model_type": model_type(config), "dtype": str(config.dtype),
            "device": "vllm", "params": param_counts(empty)}


def _harness_name(task: str, local: bool) -> str:
    spec = TASKS.get(task)
    return spec.local_name if (local and spec) else task


def _result_key(task: str, name: str) -> str:
    """Which entry of the harness's results holds the task's headline numbers."""
    spec = TASKS.get(task)
    if spec and name == spec.local_name and not (spec.subject_field and spec.group):
        return spec.leaves[0] if spec.leaves else spec.name  # the referenced harness task or group
    return name


def _task_metrics(task: str, name: str, out: dict) -> dict:
    key = _result_key(task, name)
    res = out["results"].get(key)
    if res is None:
        raise MoekitError(f"the harness returned no results for '{key}' (task '{task}')")
    metrics = {}
    for m in METRICS:
        v = res.get(f"{m},none")
        se = res.get(f"{m}_stderr,none")
        metrics[m] = None if v is None else float(v)
        metrics[f"{m}_stderr"] = None if se in (None, "N/A") else float(se)
    chosen = summary_metric(task)
    if metrics.get(chosen) is None:
        chosen = "acc"
    metrics["summary"] = metrics[chosen]
    metrics["summary_metric"] = chosen
    metrics["n"] = _count(key, out)
    return metrics


def _count(key: str, out: dict) -> int:
    ns = out.get("n-samples", {})
    if key in ns:
        return int(ns[key]["effective"])
    children = out.get("group_subtasks", {}).get(key, [])
    return sum(_count(c, out) for c in children)


def _data_info(task: str, local: bool, metadata: dict) -> dict:
    if not local:
        return {"source": "hub", "dataset": _hub_dataset(task)}
    from moekit.eval.tasks.local_data import read_records, resolve_file

    path = resolve_file(task, TASKS[task].file, metadata.get("moekit_data_dir"), metadata.get("moekit_files"))
    return {"source": "local", "path": str(path), "sha256": _sha256(path), "records": len(read_records(path))}


def _hub_dataset(task: str) -> str | None:
    entry = _task_index(full=task not in TASKS).task_index.get(task)
    if entry is None or entry.cfg is None:
        return None
    return entry.cfg.get("dataset_path")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_info(model, name: str | None = None) -> dict:
    from moekit.core.arch import model_type, param_counts
    from moekit.profile.stats import fingerprint

    p = next(model.parameters())
    return {"name": name, "fingerprint": fingerprint(model), "model_type": model_type(model),
            "dtype": str(p.dtype).removeprefix("torch."), "device": str(p.device), "params": param_counts(model)}


def _moekit_version() -> str:
    from moekit.version import __version__

    return __version__


def _harness_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "?")


class _DropNoise(logging.Filter):
    """Harness warnings that are expected here (a model object, local data, an explicit num_fewshot)."""

    EXPECTED = ("Custom kwargs can be passed", "model kwarg is not of type", "Passed an already-initialized model",
                "Overwriting default num_fewshot")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(e in msg for e in self.EXPECTED)


@contextlib.contextmanager
def _quiet_harness(verbose: bool):
    """The harness logs a line per task and per subject; keep warnings and errors, drop the rest."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    noise = _DropNoise()
    if not verbose:
        logger.setLevel(logging.WARNING)
    for h in logging.getLogger().handlers + logger.handlers:
        h.addFilter(noise)
    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.models.huggingface", "lm_eval.evaluator")]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        logger.setLevel(level)
        for lg in loggers:
            lg.removeFilter(noise)
        for h in logging.getLogger().handlers + logger.handlers:
            h.removeFilter(noise)


def markdown_table(results: list[dict]) -> str:
    """One row per result: model, parameters, each task's summary metric (and perplexity when measured)."""
    tasks: list[str] = []
    for r in results:
        tasks += [t for t in r["tasks"] if t not in tasks]
    has_ppl = any(r.get("perplexity") for r in results)
    head = ["model", "params", "active"] + [f"{t} ({summary_metric(t)})" for t in tasks] + (["ppl"] if has_ppl else [])
    rows = []
    for r in results:
        m = r["model"]
        row = [m.get("name") or m["fingerprint"], millions(m["params"]["total"]), millions(m["params"]["active"])]
        for t in tasks:
            v = r["tasks"].get(t)
            # the column's metric, not the file's summary: files written under another summary choice still line up
            x = None if v is None else v.get(summary_metric(t), v["summary"])
            row.append(None if x is None else f"{x:.4f} (n={v['n']})")
        if has_ppl:
            row.append(fmt((r.get("perplexity") or {}).get("value"), ".2f"))
        rows.append(row)
    return format_table(head, rows)


def write_result(result: dict, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (JSON) and the Markdown table beside it (same name, ``.md``), each atomically."""
    out = Path(out)
    text = markdown_table([result])
    if result.get("costs"):
        from moekit.eval.costs import costs_table

        text += "\n" + costs_table(result["costs"])
    return write_json(out, result), write_text(out.with_suffix(".md"), text)
