"""Recipes: an ordered list of steps in YAML, validated before any work starts, run into one directory.

    model: smollm2-moe
    data:
      calib: $MOEKIT_DATA/calib/c4_train_head.jsonl     # calibration text (profile, merge, heal, distill)
      eval: $MOEKIT_DATA/dev/c4_valid_dev.jsonl        # perplexity text
      tasks_dir: $MOEKIT_DATA/dev                       # local task files for `eval`
    steps:
      - eval: {tasks: [arc_easy], limit: 300}
      - profile: {n_seq: 16, seq_len: 512}
      - prune: {criterion: topk_prime, top_k_prime: 6}
      - route: {top_k: 4, mitigations: [compensate]}
      - eval: {tasks: [arc_easy], limit: 300}

Each step's options are the fields of that method's config dataclass (``PruneConfig`` for ``prune`` ...),
so the recipe and the Python API never drift apart. Errors name the recipe line.

This module parses; :mod:`moekit.pipeline.runner` runs. The step names are the methods registered in
:mod:`moekit.core.registry` (``moekit/methods.py`` lists them) plus ``eval``, so a new method is a recipe step
without touching this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moekit.errors import MoekitError, reading

TOP_LEVEL = {"model", "data", "steps", "name", "seed", "dtype", "device"}
DATA_DEFAULTS = {"calib_seqs": 16, "calib_seq_len": 512}  # calibration sequences and their length
DATA_KEYS = {"calib", "eval", "tasks_dir", "field"} | set(DATA_DEFAULTS)


@dataclass
class EvalStep:
    """Options of the ``eval`` step: perplexity on ``data.eval`` and tasks from ``data.tasks_dir``."""

    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 8
    num_fewshot: int = 0
    ppl_tokens: int = 16384
    ppl_window: int = 1024
    speed: bool = True


@dataclass
class Step:
    name: str
    options: dict[str, Any]
    line: int
    config: Any = None


@dataclass
class Recipe:
    path: Path
    model: str
    steps: list[Step]
    data: dict[str, Any] = field(default_factory=dict)
    name: str = "run"
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"

    def fingerprint(self) -> str:
        payload = json.dumps({"model": self.model, "data": self.data, "seed": self.seed,
                              "steps": [(s.name, s.options) for s in self.steps]}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


def step_configs() -> dict[str, type]:
    """Step name -> its config class: every registered method, and ``eval``."""
    from moekit.methods import METHODS

    return {**{name: m.config for name, m in METHODS.items()}, "eval": EvalStep}


def config_class(step: str) -> type:
    configs = step_configs()
    if step not in configs:
        raise MoekitError(f"unknown step '{step}' (known: {', '.join(configs)})")
    return configs[step]


def load_recipe(path: str | Path, *, expand_env: bool = True) -> Recipe:
    """Parse and validate a recipe; every error names its line."""
    path = Path(path)
    if not path.exists():
        raise MoekitError(f"recipe '{path}' does not exist")
    with reading(path, "recipe", "a recipe is a UTF-8 YAML file"):
        text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
        raise MoekitError(f"{path}:{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(root, yaml.MappingNode):
        raise MoekitError(f"{path}:1: a recipe is a mapping with 'model' and 'steps'")
    top = {k.value: (k, v) for k, v in root.value}
    for key, (knode, _) in top.items():
        if key not in TOP_LEVEL:
            raise MoekitError(f"{path}:{knode.start_mark.line + 1}: unknown top-level key '{key}' (use {', '.join(sorted(TOP_LEVEL))})")
    if "model" not in top or "steps" not in top:
        raise MoekitError(f"{path}:1: a recipe needs 'model' and 'steps'")
    try:
        plain = yaml.safe_load(text)  # safe: a Python tag (!!python/...) is refused, never constructed
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
        raise MoekitError(f"{path}:{line}: not valid YAML for a recipe ({getattr(e, 'problem', e)}); "
                          "Python tags are never run") from None
    data = plain.get("data") or {}
    for key in data:
        if key not in DATA_KEYS:
            line = _line_of(top["data"][1], key)
            raise MoekitError(f"{path}:{line}: unknown data key '{key}' (use {', '.join(sorted(DATA_KEYS))})")
        if expand_env and isinstance(data[key], str):
            data[key] = _expand(data[key], f"{path}:{_line_of(top['data'][1], key)}")
    steps_node = top["steps"][1]
    if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
        raise MoekitError(f"{path}:{steps_node.start_mark.line + 1}: 'steps' must be a non-empty list")
    steps = [_parse_step(path, node, raw) for node, raw in zip(steps_node.value, plain["steps"], strict=True)]
    recipe = Recipe(path=path, model=str(plain["model"]), steps=steps, data=data, name=str(plain.get("name", path.stem)),
                    seed=int(plain.get("seed", 0)), dtype=str(plain.get("dtype", "auto")), device=str(plain.get("device", "auto")))
    _check_combinations(recipe)
    return recipe


def _expand(value: str, where: str) -> str:
    """``$VAR`` / ``${VAR}`` in a data path (the shipped recipes use ``$MOEKIT_DATA``); an unset one is an error."""
    out = os.path.expandvars(value)
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", out)
    if unset:
        raise MoekitError(f"{where}: '{value}' uses ${unset[0]}, which is not set: export {unset[0]}=<folder> "
                          "(for the shipped recipes, the data folder holding calib/ and dev/)")
    return out


def _line_of(mapping_node, key: str) -> int:
    for k, _ in getattr(mapping_node, "value", []):
        if k.value == key:
            return k.start_mark.line + 1
    return mapping_node.start_mark.line + 1


def _parse_step(path: Path, node, raw) -> Step:
    line = node.start_mark.line + 1
    if isinstance(raw, str):
        raw, node_opts = {raw: {}}, None
    elif not (isinstance(raw, dict) and len(raw) == 1):
        raise MoekitError(f"{path}:{line}: each step is one mapping 'name: {{options}}'")
    else:
        node_opts = node.value[0][1]
    name, options = next(iter(raw.items()))
    options = options or {}
    if name not in step_configs():
        raise MoekitError(f"{path}:{line}: unknown step '{name}' (known: {', '.join(step_configs())})")
    if not isinstance(options, dict):
        raise MoekitError(f"{path}:{line}: options of step '{name}' must be a mapping")
    try:
        cls = config_class(name)
    except MoekitError as e:
        raise MoekitError(f"{path}:{line}: {e}") from None
    allowed = {f.name for f in dataclasses.fields(cls)}
    for key in options:
        if key not in allowed:
            opt_line = _line_of(node_opts, key) if node_opts is not None else line
            owner = [s for s in step_configs() if s != name and _has_field(s, key)]
            hint = f"; '{key}' is an option of step '{owner[0]}'" if owner else f"; options of '{name}': {', '.join(sorted(allowed))}"
            raise MoekitError(f"{path}:{opt_line}: step '{name}' has no option '{key}'{hint}")
    try:
        config = cls(**options)
        if hasattr(config, "validate"):
            config.validate()
    except (TypeError, ValueError, MoekitError) as e:
        raise MoekitError(f"{path}:{line}: bad options for step '{name}': {e}") from None
    return Step(name=name, options=options, line=line, config=config)


def _has_field(step: str, key: str) -> bool:
    try:
        return key in {f.name for f in dataclasses.fields(config_class(step))}
    except MoekitError:
        return False


def _check_combinations(recipe: Recipe) -> None:
    """Impossible combinations that can be seen without loading weights."""
    kept = None
    for step in recipe.steps:
        opts = step.options
        if step.name == "prune" and opts.get("keep"):
            kept = int(opts["keep"])
        if step.name == "merge" and opts.get("target"):
            kept = int(opts["target"])
        if step.name == "route" and kept is not None and opts.get("top_k") and int(opts["top_k"]) > kept:
            raise MoekitError(
                f"{recipe.path}:{step.line}: top-k {opts['top_k']} is above the {kept} experts kept by an earlier step; lower top_k or keep more"
            )


def demo_recipe(path: str | Path, data_dir: str | Path, limit: int | None) -> Recipe:
    """The shipped embedded-default recipe, pointed at ``data_dir`` (calib/ and dev/) when it exists.

    Without it (a fresh clone with no data beside it) calibration and perplexity use text the model samples
    itself and task accuracy is skipped, so the demo still runs offline.
    """
    recipe = load_recipe(path, expand_env=False)  # the data paths are replaced below
    data_dir = Path(data_dir)
    calib, dev = data_dir / "calib" / "c4_train_head.jsonl", data_dir / "dev"
    if calib.exists() and (dev / "c4_valid_dev.jsonl").exists():
        recipe.data.update(calib=str(calib), eval=str(dev / "c4_valid_dev.jsonl"), tasks_dir=str(dev))
    else:
        recipe.data.update(calib="self", eval=None, tasks_dir=None)
    for step in recipe.steps:
        if step.name == "eval":
            if limit is not None:
                step.config.limit = limit
            if recipe.data.get("tasks_dir") is None:
                step.config.tasks = []
    return recipe
