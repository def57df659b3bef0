"""Recipes: an ordered list of steps in YAML, validated before any work starts, run into one directory.

    model: smollm2-moe
    data:
      calib: ../shared/data/calib/c4_train_head.jsonl     # calibration text (profile, merge, heal, distill)
      eval: ../shared/data/dev/c4_valid_dev.jsonl        # perplexity text
      tasks_dir: ../shared/data/dev                       # local task files for `eval`
    steps:
      - eval: {tasks: [arc_easy], limit: 300}
      - profile: {n_seq: 16, seq_len: 512}
      - prune: {criterion: topk_prime, top_k_prime: 6}
      - route: {top_k: 4, mitigations: [compensate]}
      - eval: {tasks: [arc_easy], limit: 300}

Each step's options are the fields of that method's config dataclass (``PruneConfig`` for ``prune`` ...),
so the recipe and the Python API never drift apart. Errors name the recipe line.

Running writes ``RUN_DIR/NN-step/`` per step (checkpoints through the atomic, verified export, results as
JSON) and a ``done.json`` marker last; a re-run skips finished steps and resumes from the last checkpoint.
Profiles are cached by (model fingerprint, data, options) and reused across runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moekit.errors import MoekitError

# step name -> (module, config class); the module's runner is `recipe_step(ctx, config)`
STEP_CONFIGS: dict[str, tuple[str, str]] = {
    "carve": ("moekit.carve.carve", "CarveConfig"),
    "heal": ("moekit.carve.heal", "HealConfig"),
    "profile": ("moekit.profile.profile", "ProfileConfig"),
    "prune": ("moekit.prune.prune", "PruneConfig"),
    "merge": ("moekit.merge.merge", "MergeConfig"),
    "route": ("moekit.route.route", "RouteConfig"),
    "densify": ("moekit.densify.densify", "DensifyConfig"),
    "distill": ("moekit.train.distill", "DistillConfig"),
    "eval": ("moekit.pipeline.recipe", "EvalStep"),
}
TOP_LEVEL = {"model", "data", "steps", "name", "seed", "dtype", "device"}
DATA_KEYS = {"calib", "eval", "tasks_dir", "field"}


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


def config_class(step: str):
    module, cls = STEP_CONFIGS[step]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise MoekitError(f"step '{step}' is not available in this moekit build ({module}.{cls} missing)") from None


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; every error names its line."""
    path = Path(path)
    if not path.exists():
        raise MoekitError(f"recipe '{path}' does not exist")
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
    plain = yaml.safe_load(text)
    data = plain.get("data") or {}
    for key in data:
        if key not in DATA_KEYS:
            line = _line_of(top["data"][1], key)
            raise MoekitError(f"{path}:{line}: unknown data key '{key}' (use {', '.join(sorted(DATA_KEYS))})")
    steps_node = top["steps"][1]
    if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
        raise MoekitError(f"{path}:{steps_node.start_mark.line + 1}: 'steps' must be a non-empty list")
    steps = [_parse_step(path, node, raw) for node, raw in zip(steps_node.value, plain["steps"], strict=True)]
    recipe = Recipe(path=path, model=str(plain["model"]), steps=steps, data=data, name=str(plain.get("name", path.stem)),
                    seed=int(plain.get("seed", 0)), dtype=str(plain.get("dtype", "auto")), device=str(plain.get("device", "auto")))
    _check_combinations(recipe)
    return recipe


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
    if name not in STEP_CONFIGS:
        raise MoekitError(f"{path}:{line}: unknown step '{name}' (known: {', '.join(STEP_CONFIGS)})")
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
            owner = [s for s in STEP_CONFIGS if s != name and _has_field(s, key)]
            hint = f"; '{key}' is an option of step '{owner[0]}'" if owner else f"; options of '{name}': {', '.join(sorted(allowed))}"
            raise MoekitError(f"{path}:{opt_line}: step '{name}' has no option '{key}'{hint}")
    try:
        config = cls(**options)
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


# ---------------------------------------------------------------------------------------------- running
DATA_DEFAULTS = {"calib_seqs": 16, "calib_seq_len": 512}
DATA_KEYS |= set(DATA_DEFAULTS)
MODEL_STEPS = {"carve", "heal", "prune", "merge", "route", "densify", "distill"}  # steps that change the model


@dataclass
class Context:
    """What flows between steps."""

    recipe: Recipe
    run_dir: Path
    model: Any = None
    tokenizer: Any = None
    teacher: Any = None  # the model before the last carve/densify (heal and distill learn from it)
    stats: Any = None
    calib: Any = None  # calibration token ids [n, L]
    results: list[dict] = field(default_factory=list)
    progress: bool = True

    def calib_tokens(self):
        if self.calib is None:
            from moekit.data import calibration_tokens

            d = self.recipe.data
            source = d.get("calib") or "self"
            self.calib = calibration_tokens(source, self.tokenizer, n_seq=int(d.get("calib_seqs", 16)),
                                            seq_len=int(d.get("calib_seq_len", 512)), field=d.get("field", "text"),
                                            seed=self.recipe.seed, model=self.model)
        return self.calib

    def current_stats(self, profile_config=None):
        """Statistics of the model as it is now: cached by (fingerprint, data, options), profiled when stale."""
        from moekit.profile.stats import fingerprint

        if self.stats is not None and self.stats.meta.get("fingerprint") == fingerprint(self.model):
            return self.stats
        self.stats = cached_profile(self.model, self.calib_tokens(), self.recipe.data, profile_config, progress=self.progress)
        return self.stats


def cached_profile(model, tokens, data: dict, profile_config=None, *, progress: bool = True):
    """Profile ``model`` on ``tokens``, reusing ``cache_dir('profiles')`` when model, data and options match."""
    import torch

    from moekit.checkpoint.paths import cache_dir
    from moekit.profile.stats import fingerprint
    from moekit.profile.profile import ProfileConfig, profile
    from moekit.profile.stats import ExpertStats

    cfg = profile_config or ProfileConfig()
    cfg.progress = progress
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "data")}
    token_hash = hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([fingerprint(model), token_hash, options], sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir("profiles") / f"{key}.safetensors"
    if path.exists():
        return ExpertStats.load(path)
    cfg.data = {"source": str(data.get("calib") or "self"), "n_seq": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}
    stats = profile(model, tokens, cfg)
    stats.save(path)
    return stats


def run_recipe(recipe: Recipe, run_dir: str | Path, *, progress: bool = True) -> list[dict]:
    """Run every step into ``run_dir``; finished steps (``done.json``) are skipped on a re-run."""
    from moekit.checkpoint.load import load_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe.path.read_text(encoding="utf-8"), encoding="utf-8")
    ctx = Context(recipe=recipe, run_dir=run_dir, progress=progress)
    # resume: the newest finished checkpoint is the model; the one before the last carve/densify is the teacher
    source, teacher_source = str(recipe.model), None
    for i, step in enumerate(recipe.steps):
        sdir = _step_dir(run_dir, i, step)
        if not (sdir / "done.json").exists():
            break
        if step.name in ("carve", "densify"):
            teacher_source = source
        if (sdir / "model").exists():
            source = str(sdir / "model")
    ctx.model, ctx.tokenizer = load_model(source, dtype=recipe.dtype, device=recipe.device)
    if teacher_source is not None:
        ctx.teacher, _ = load_model(teacher_source, dtype=recipe.dtype, device=recipe.device, with_tokenizer=False)
    for i, step in enumerate(recipe.steps):
        sdir = _step_dir(run_dir, i, step)
        done = sdir / "done.json"
        if done.exists():
            ctx.results.append(json.loads(done.read_text()))
            continue
        sdir.mkdir(parents=True, exist_ok=True)
        record = {"step": step.name, "index": i, "options": step.options}
        record.update(STEP_RUNNERS[step.name](ctx, step.config, sdir) or {})
        if step.name in MODEL_STEPS:
            from moekit.checkpoint.save import save_model

            save_model(ctx.model, ctx.tokenizer, sdir / "model", overwrite=True)
        _write_json(done, record)  # last: its presence means the step finished
        ctx.results.append(record)
    return ctx.results


def _step_dir(run_dir: Path, i: int, step: Step) -> Path:
    return run_dir / f"{i + 1:02d}-{step.name}"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default), encoding="utf-8")
    tmp.replace(path)


def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _as_dict(report) -> dict:
    if report is None:
        return {}
    if dataclasses.is_dataclass(report):
        return dataclasses.asdict(report)
    return dict(report) if isinstance(report, dict) else {"report": str(report)}


# ------------------------------------------------------------------------------- one runner per step
def _run_carve(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.carve.carve import carve

    ctx.teacher = ctx.model
    ctx.model = carve(ctx.model, ctx.calib_tokens(), cfg, progress=ctx.progress)
    return {}


def _run_heal(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.carve.heal import heal_

    if ctx.teacher is None:
        raise MoekitError(f"{ctx.recipe.path}: 'heal' needs the dense model it learns from: put it right after 'carve'")
    return {"report": _as_dict(heal_(ctx.model, ctx.teacher, ctx.calib_tokens(), cfg, progress=ctx.progress))}


def _run_profile(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.profile.plots import write_plots

    ctx.stats = None
    stats = ctx.current_stats(cfg)
    stats.save(sdir / "stats.safetensors")
    figures = [str(p) for p in write_plots(stats, sdir)]
    from moekit.profile.stats import super_experts

    return {"stats": str(sdir / "stats.safetensors"), "figures": figures,
            "super_experts": [list(p) for p in super_experts(stats)], "tokens": stats.tokens}


def _run_prune(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.prune.prune import prune_

    return {"report": _as_dict(prune_(ctx.model, ctx.current_stats(), cfg))}


def _run_merge(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.merge.merge import merge_

    return {"report": _as_dict(merge_(ctx.model, ctx.current_stats(), cfg, calib_tokens=ctx.calib_tokens()))}


def _run_route(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.route.route import route_

    return {"report": _as_dict(route_(ctx.model, ctx.current_stats(), cfg, tokens=ctx.calib_tokens()))}


def _run_densify(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.densify.densify import densify

    ctx.teacher = ctx.model
    ctx.model = densify(ctx.model, ctx.current_stats(), cfg)
    return {}


def _run_distill(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.train.distill import distill

    if ctx.teacher is None:
        raise MoekitError(f"{ctx.recipe.path}: 'distill' needs a teacher: put it after 'densify' or 'carve'")
    return {"report": _as_dict(distill(ctx.model, ctx.teacher, ctx.calib_tokens(), cfg, tokenizer=ctx.tokenizer))}


def _run_eval(ctx: Context, cfg: EvalStep, sdir: Path) -> dict:
    from moekit.core.arch import describe
    from moekit.eval.perplexity import perplexity, windows

    d = ctx.recipe.data
    from moekit.core.arch import moe_layers

    record: dict[str, Any] = {"model": describe(ctx.model)}
    record["model"]["experts_by_layer"] = [layer.num_experts for layer in moe_layers(ctx.model)]
    record["model"]["top_k_by_layer"] = [layer.top_k for layer in moe_layers(ctx.model)]
    if d.get("eval"):
        toks = windows(ctx.tokenizer, d["eval"], max_tokens=cfg.ppl_tokens, window=cfg.ppl_window, field=d.get("field", "text"))
        record["perplexity"] = {"value": perplexity(ctx.model, toks, progress=ctx.progress), "tokens": int(toks.numel()),
                                "data": d["eval"]}
    if cfg.tasks:
        from moekit.eval.harness import evaluate, write_result

        result = evaluate(ctx.model, ctx.tokenizer, tasks=cfg.tasks, data_dir=d.get("tasks_dir"), limit=cfg.limit,
                          batch_size=cfg.batch_size, num_fewshot=cfg.num_fewshot)
        write_result(result, sdir / "eval.json")
        record["tasks"] = {t: m["summary"] for t, m in result["tasks"].items()}
        record["limit"] = cfg.limit
    if cfg.speed:
        from moekit.eval.costs import speed

        record["speed"] = speed(ctx.model)
    return record


STEP_RUNNERS = {"carve": _run_carve, "heal": _run_heal, "profile": _run_profile, "prune": _run_prune,
                "merge": _run_merge, "route": _run_route, "densify": _run_densify, "distill": _run_distill,
                "eval": _run_eval}


def demo_recipe(path: str | Path, data_dir: str | Path, limit: int | None) -> Recipe:
    """The shipped embedded-default recipe, pointed at ``data_dir`` (calib/ and dev/) when it exists.

    Without it (a fresh clone with no data beside it) calibration and perplexity use text the model samples
    itself and task accuracy is skipped, so the demo still runs offline.
    """
    recipe = load_recipe(path)
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
