"""Where and in what precision a model runs."""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.errors import MoekitError


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MoekitError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise MoekitError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16") from None


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory free for a new model on ``device``: on CUDA what the driver reports free; on CPU the system's available
    memory, or less when the process sits in a memory-limited cgroup (v1 or v2), as containers and `moekit`'s own
    benchmarks under a cap do."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    free = int(psutil.virtual_memory().available)
    for limit, usage in _cgroup_files():
        try:
            cap = int(Path(limit).read_text().strip())
            used = int(Path(usage).read_text().strip())
        except (OSError, ValueError):  # no such cgroup file, or "max": no limit there
            continue
        free = min(free, max(0, cap - used))
    return free


def _cgroup_files() -> list[tuple[str, str]]:
    """(limit, usage) files of the memory cgroups this process is in (v1 and v2)."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            out.append((f"/sys/fs/cgroup{path}/memory.max", f"/sys/fs/cgroup{path}/memory.current"))
        elif "memory" in controllers.split(","):
            base = f"/sys/fs/cgroup/memory{path}"
            out.append((f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes"))
    return out
