"""The embedded default MoE ``smollm2-moe``: SmolLM2-135M-Instruct carved (CMoE) and healed, built on first use.

The recipe (``RECIPE``) is fixed and versioned: changing it changes the cache directory name, so an old
build is never mistaken for a new one. A lock file makes concurrent first uses wait for one build.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from .carve import CarveConfig
from .heal import HealConfig

RECIPE_VERSION = "v1"
CALIB_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "calib" / "c4_train_head.jsonl"
# 1536 FFN neurons -> 32 experts of 48: one shared expert of 8*48 = 384 neurons, 24 routed, top-8;
# active per token 384 + 8*48 = 768 = half the FFN.
CARVE = CarveConfig(experts=32, shared=8, active=8, k_a=10, iterations=1)
HEAL = HealConfig(router=True, lstsq=True, local_epochs=0)
CALIB_SEQS, CALIB_LEN = 16, 512  # 8,192 calibration tokens


def embedded_name() -> str:
    return f"smollm2-moe-{RECIPE_VERSION}"


def _ready(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def embedded_moe_path() -> Path:
    """Directory of ``smollm2-moe`` in the cache, building it (carve + heal, minutes on a CPU) on first use."""
    from .models import cache_dir

    out = cache_dir("models") / embedded_name()
    if _ready(out):
        return out
    lock = cache_dir("models") / f".{embedded_name()}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second process waits here until the first build is in place
        try:
            if not _ready(out):
                build_embedded(out)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return out


def build_embedded(out: Path) -> Path:
    """Carve and heal SmolLM2 with the fixed recipe and save it to ``out`` (atomic, verified)."""
    import torch

    from .carve import carve
    from .data import calibration_tokens
    from .export import save_model
    from .heal import heal_
    from .models import load_model

    start = time.perf_counter()
    source = str(CALIB_FILE) if CALIB_FILE.exists() else "self"
    print(f"moekit: building the embedded default 'smollm2-moe' ({RECIPE_VERSION}) from smollm2 on '{source}'; "
          "this runs once and takes a few minutes on a CPU", file=sys.stderr)
    with torch.no_grad():
        dense, tok = load_model("smollm2", dtype=torch.float32, device="cpu")
        calib = calibration_tokens(source, tok, n_seq=CALIB_SEQS, seq_len=CALIB_LEN, seed=0, model=dense)
        moe = carve(dense, calib, CARVE)
    heal_(moe, dense, calib, HealConfig(**{k: v for k, v in vars(HEAL).items() if k != "report"}))
    moe.config.moekit_embedded = {"name": "smollm2-moe", "recipe": RECIPE_VERSION, "calibration": os.path.basename(source),
                                  "calibration_tokens": int(calib.numel()),
                                  "build_seconds": round(time.perf_counter() - start, 1)}
    save_model(moe, tok, out, overwrite=True, verify=True)
    print(f"moekit: 'smollm2-moe' built in {time.perf_counter() - start:.0f} s -> {out}", file=sys.stderr)
    return out
