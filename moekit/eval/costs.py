"""What a model costs: parameters, bytes on disk, peak memory of a forward pass, prefill and decode speed.

Absolute figures depend on the machine and on what else runs on it; the honest number is a ratio between the
original and the compressed model measured in the same run, so :func:`compare_costs` measures both, alternating
repeats, and reports ``compressed / original`` for every figure.

* ``params``: :func:`moekit.arch.param_counts` (total, in routed experts, active per token).
* ``weights_bytes``: bytes of the model's unique tensors in memory; ``checkpoint_bytes``: bytes of the files of
  a saved checkpoint directory (when given).
* ``peak_forward_bytes``: extra memory at the peak of one forward pass over ``batch x prompt_tokens``. On CUDA,
  ``torch.cuda.max_memory_allocated`` minus what was allocated before. On CPU, the process's resident set
  sampled every 0.5 ms in a thread (after returning freed heap to the system with ``malloc_trim``), minus the
  resident set before: the allocator's own view, not tracemalloc (torch allocates outside Python).
* ``prefill_tokens_per_s``: prompt tokens per second of one forward pass (``logits_to_keep=1``, as generation does);
  ``decode_tokens_per_s``: tokens per second of greedy single-token steps from the prompt's KV cache.
  Median over ``repeats``.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.errors import MoekitError
from moekit.eval.results import fmt, format_table, mib, millions

RATIO_KEYS = ("params_total", "params_active", "weights_bytes", "checkpoint_bytes", "peak_forward_bytes",
              "prefill_tokens_per_s", "decode_tokens_per_s")


@dataclass
class CostConfig:
    prompt_tokens: int = 256
    decode_tokens: int = 32
    batch_size: int = 1
    repeats: int = 3
    seed: int = 0


def weights_bytes(model) -> int:
    """Bytes of every distinct parameter and buffer (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the files of a saved checkpoint directory (weights, config, tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise MoekitError(f"checkpoint '{path}' is not a directory: pass the directory the model was saved to")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prompt_ids(model, cfg: CostConfig) -> torch.Tensor:
    """Seeded random token ids [batch, prompt_tokens] (speed does not depend on the words)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(3, vocab, (cfg.batch_size, cfg.prompt_tokens), generator=g).to(_device(model))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def peak_forward_bytes(model, ids: torch.Tensor) -> dict:
    """Extra memory at the peak of one forward pass over ``ids`` (see the module docstring for the method)."""
    dev = ids.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        model(input_ids=ids, use_cache=True)
        torch.cuda.synchronize(dev)
        return {"peak_forward_bytes": int(torch.cuda.max_memory_allocated(dev) - base),
                "peak_method": "torch.cuda.max_memory_allocated"}
    import psutil

    proc = psutil.Process()
    gc.collect()
    _malloc_trim()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        model(input_ids=ids, use_cache=True)
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {"peak_forward_bytes": int(peak[0] - base), "peak_method": "rss sampled every 0.5 ms (psutil)"}


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def _prefill_seconds(model, ids: torch.Tensor) -> float:
    _sync(ids.device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(ids.device)
    return time.perf_counter() - t


@torch.no_grad()
def _decode_seconds(model, ids: torch.Tensor, steps: int) -> float:
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(ids.device)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(ids.device)
    return time.perf_counter() - t


def speed(model, config: CostConfig | None = None, progress: bool = False) -> dict:
    """Prefill and decode tokens per second (median of ``repeats``), after one warm-up pass."""
    return _measure_speed([model], config or CostConfig(), progress)[0]


def _measure_speed(models: list, cfg: CostConfig, progress: bool) -> list[dict]:
    ids = [prompt_ids(m, cfg) for m in models]
    for m, x in zip(models, ids, strict=True):  # warm-up (allocator, kernels)
        _prefill_seconds(m, x[:, : min(16, x.shape[1])])
    pre: list[list[float]] = [[] for _ in models]
    dec: list[list[float]] = [[] for _ in models]
    for _ in tqdm(range(cfg.repeats), desc="speed", disable=not progress, leave=False):
        for i, (m, x) in enumerate(zip(models, ids, strict=True)):  # alternate: drift hits every model alike
            pre[i].append(_prefill_seconds(m, x))
            dec[i].append(_decode_seconds(m, x, cfg.decode_tokens))
    tokens = cfg.batch_size * cfg.prompt_tokens
    return [{"prefill_tokens_per_s": tokens / statistics.median(p),
             "decode_tokens_per_s": cfg.batch_size * cfg.decode_tokens / statistics.median(d)}
            for p, d in zip(pre, dec, strict=True)]


def measure_costs(model, checkpoint: str | Path | None = None, config: CostConfig | None = None,
                  progress: bool = True) -> dict:
    """Every cost figure of one model (see :func:`compare_costs` for two models side by side)."""
    return compare_costs([model], [checkpoint], config, progress=progress)["models"][0]


def compare_costs(models: list, checkpoints: list | None = None, config: CostConfig | None = None,
                  names: list[str] | None = None, progress: bool = True) -> dict:
    """Cost figures of several models measured in one run; ``ratio[k]`` = each model / the first, per figure."""
    from moekit.core.arch import param_counts

    cfg = config or CostConfig()
    checkpoints = checkpoints or [None] * len(models)
    names = names or [None] * len(models)
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        speeds = _measure_speed(models, cfg, progress)
        rows = []
        for m, ck, name, sp in zip(models, checkpoints, names, speeds, strict=True):
            p = param_counts(m)
            mem = peak_forward_bytes(m, prompt_ids(m, cfg))
            rows.append({"name": name, "params_total": p["total"], "params_experts": p["experts"],
                         "params_active": p["active"], "weights_bytes": weights_bytes(m),
                         "checkpoint_bytes": checkpoint_bytes(ck) if ck else None, **mem, **sp,
                         "device": str(_device(m)), "dtype": str(next(m.parameters()).dtype).removeprefix("torch.")})
    finally:
        for m, w in zip(models, was, strict=True):
            m.train(w)
    base = rows[0]
    ratios = [{k: (r[k] / base[k] if r.get(k) is not None and base.get(k) else None) for k in RATIO_KEYS} for r in rows]
    return {"config": asdict(cfg), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "models": rows,
            "ratio": ratios, "model_index": 0}


def costs_table(costs: dict) -> str:
    """Markdown: one column per model, one row per figure, and the ratio to the first model."""
    rows = costs["models"]
    head = ["figure"] + [r.get("name") or f"model {i}" for i, r in enumerate(rows)]
    if len(rows) > 1:
        head += [f"ratio {h}" for h in head[2:]]
    cells = [[k, *[None if r.get(k) is None else _figure(k, r[k]) for r in rows],
              *[fmt(q[k], ".3f") for q in costs["ratio"][1:]]] for k in RATIO_KEYS]
    return format_table(head, cells)


def _figure(key: str, v) -> str:
    """Bytes in MiB, parameter counts in millions, rates to one decimal."""
    if key.endswith("bytes"):
        return mib(v)
    return millions(v, digits=2) if key.startswith("params") else f"{v:.1f}"
