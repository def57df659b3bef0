"""The embedded default MoE ``smollm2-moe``: SmolLM2-135M-Instruct carved (CMoE) and healed, built on first use.

The recipe is fixed and versioned, and the cache directory's name records both the recipe version and the
calibration source (``$MOEKIT_DATA/calib/c4_train_head.jsonl`` when ``MOEKIT_DATA`` is set, else text the
dense model samples itself), so a build on one source is never mistaken for the other. A lock file makes
concurrent first uses wait for one build.
"""

from __future__ import annotations

import dataclasses

import fcntl
import os
import sys
import time
from pathlib import Path

from moekit.carve.carve import CarveConfig, carve
from moekit.carve.heal import HealConfig, heal_
from moekit.checkpoint.paths import cache_dir, data_dir
from moekit.checkpoint.read import read_dir
from moekit.checkpoint.save import save_model
from moekit.checkpoint.smollm2 import smollm2_path
from moekit.core.keys import EMBEDDED_KEY
from moekit.data import calibration_tokens

RECIPE_VERSION = "v2"  # v2: zero q/k/v biases written (vLLM ran v1 with uninitialised ones)
CALIB_FILE = Path("calib") / "c4_train_head.jsonl"  # relative to $MOEKIT_DATA
# 1536 FFN neurons -> 32 experts of 48: one shared expert of 8*48 = 384 neurons, 24 routed, top-8;
# active per token 384 + 8*48 = 768 = half the FFN.
CARVE = CarveConfig(experts=32, shared=8, active=8, k_a=10, iterations=1)
HEAL = HealConfig(router=True, lstsq=True, local_epochs=0)
CALIB_SEQS, CALIB_LEN = 16, 512  # 8,192 calibration tokens


def calibration_source() -> str:
    """The calibration text the embedded default is built on: the C4 head under ``$MOEKIT_DATA``, or "self"."""
    root = data_dir()
    if root is not None and (root / CALIB_FILE).exists():
        return str(root / CALIB_FILE)
    return "self"


def embedded_name(source: str | None = None) -> str:
    """Cache directory name: recipe version and calibration source (``c4`` or ``self``)."""
    source = calibration_source() if source is None else source
    return f"smollm2-moe-{RECIPE_VERSION}-{'self' if source == 'self' else 'c4'}"


def _ready(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def embedded_moe_path() -> Path:
    """Directory of ``smollm2-moe`` in the cache, building it (carve + heal, minutes on a CPU) on first use."""
    source = calibration_source()
    out = cache_dir("models") / embedded_name(source)
    if _ready(out):
        return out
    lock = cache_dir("models") / f".{out.name}.lock"
    with open(lock, "w") as f:  # not an output: a lock file that orders concurrent builds
        fcntl.flock(f, fcntl.LOCK_EX)  # a second process waits here until the first build is in place
        try:
            if not _ready(out):
                build_embedded(out, source)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return out


def build_embedded(out: Path, source: str) -> Path:
    """Carve and heal SmolLM2 with the fixed recipe on ``source`` and save it to ``out`` (atomic, verified)."""
    import torch

    start = time.perf_counter()
    if source == "self":
        print("moekit: MOEKIT_DATA is not set (or has no calib/c4_train_head.jsonl): calibrating on text the model "
              "writes itself; set MOEKIT_DATA to the data folder to build the C4-calibrated default", file=sys.stderr)
    print(f"moekit: building the embedded default 'smollm2-moe' ({RECIPE_VERSION}) from smollm2 on '{source}'; "
          "this runs once and takes a few minutes on a CPU", file=sys.stderr)
    with torch.no_grad():
        dense, tok = read_dir(smollm2_path(), torch.float32, False, None)
        dense.eval()
        calib = calibration_tokens(source, tok, n_seq=CALIB_SEQS, seq_len=CALIB_LEN, seed=0, model=dense)
        moe = carve(dense, CARVE, tokens=calib)
    heal_(moe, dataclasses.replace(HEAL), tokens=calib, teacher=dense)
    setattr(moe.config, EMBEDDED_KEY, {"name": "smollm2-moe", "recipe": RECIPE_VERSION, "calibration": os.path.basename(source),
                                  "calibration_tokens": int(calib.numel()),
                                  "build_seconds": round(time.perf_counter() - start, 1)})
    save_model(moe, tok, out, overwrite=True, verify=True)
    print(f"moekit: 'smollm2-moe' built in {time.perf_counter() - start:.0f} s -> {out}", file=sys.stderr)
    return out
