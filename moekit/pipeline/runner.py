"""Running a recipe: every step through the method registry, into one directory, resumable.

Running writes ``RUN_DIR/NN-step/`` per step (checkpoints through the atomic, verified save, results as
JSON) and a ``done.json`` marker last; a re-run skips finished steps and resumes from the last checkpoint.

A step is the registered method of its name (:mod:`moekit.core.registry`). The runner supplies what the
method ``needs``: ``stats`` (the current model's profile, cached by model fingerprint, data and options),
``tokens`` (the recipe's calibration text) and ``teacher`` (the model before the last step that built a new
model: carve or densify; before any such step, the recipe's own model, loaded when a step first needs it). Two
steps are the runner's own: ``profile`` (also saves the statistics and their plots) and ``eval`` (perplexity,
tasks, speed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.outputs import write_json, write_text
from moekit.pipeline.recipe import EvalStep, Recipe, Step


@dataclass
class Context:
    """What flows between steps."""

    recipe: Recipe
    run_dir: Path
    model: Any = None
    tokenizer: Any = None
    teacher: Any = None  # the model before the last carve/densify, else the recipe's model (distillation learns from it)
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

    def inputs(self, step: Step, needs: tuple[str, ...], uses: tuple[str, ...] = ()) -> dict:
        """The method's inputs; those it needs are computed (stats, tokens) or loaded (the recipe's model as teacher)."""
        given: dict[str, Any] = {"stats": None, "tokens": None, "teacher": self.teacher}
        if "stats" in needs:
            given["stats"] = self.current_stats()
        if "tokens" in needs or "tokens" in uses:
            given["tokens"] = self.calib_tokens()
        if "teacher" in needs and self.teacher is None:  # no carve/densify yet: the original model teaches
            from moekit.checkpoint.load import load_model

            self.teacher, _ = load_model(str(self.recipe.model), dtype=self.recipe.dtype, device=self.recipe.device,
                                         with_tokenizer=False)
            given["teacher"] = self.teacher
        return given


def cached_profile(model, tokens, data: dict, profile_config=None, *, progress: bool = True):
    """Profile ``model`` on ``tokens``, reusing ``cache_dir('profiles')`` when model, data and options match."""
    import torch

    from moekit.checkpoint.paths import cache_dir
    from moekit.profile.profile import ProfileConfig, profile
    from moekit.profile.stats import ExpertStats, fingerprint

    cfg = dataclasses.replace(profile_config) if profile_config is not None else ProfileConfig()
    cfg.progress = progress
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "data")}
    token_hash = hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    key = hashlib.sha256(json.dumps([fingerprint(model), token_hash, options], sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir("profiles") / f"{key}.safetensors"
    if path.exists():
        return ExpertStats.load(path)
    cfg.data = {"source": str(data.get("calib") or "self"), "n_seq": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}
    stats = profile(model, cfg, tokens=tokens)
    stats.save(path)
    return stats


def run_recipe(recipe: Recipe, run_dir: str | Path, *, progress: bool = True) -> list[dict]:
    """Run every step into ``run_dir``; finished steps (``done.json``) are skipped on a re-run."""
    from moekit.checkpoint.load import load_model
    from moekit.checkpoint.save import save_model
    from moekit.methods import method

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    keys = step_keys(recipe)
    _drop_stale_steps(run_dir, recipe, keys)
    write_text(run_dir / "recipe.yaml", recipe.path.read_text(encoding="utf-8"), overwrite=True)  # the run folder is the run's own
    ctx = Context(recipe=recipe, run_dir=run_dir, progress=progress)
    # resume: the newest finished checkpoint is the model; the one before the last new-model step is the teacher
    source, teacher_source = str(recipe.model), None
    for i, step in enumerate(recipe.steps):
        sdir = step_dir(run_dir, i, step)
        if not (sdir / "done.json").exists():
            break
        if step.name != "eval" and method(step.name).new_model:
            teacher_source = source
        if (sdir / "model").exists():
            source = str(sdir / "model")
    ctx.model, ctx.tokenizer = load_model(source, dtype=recipe.dtype, device=recipe.device)
    if teacher_source is not None:
        ctx.teacher, _ = load_model(teacher_source, dtype=recipe.dtype, device=recipe.device, with_tokenizer=False)
    for i, step in enumerate(recipe.steps):
        sdir = step_dir(run_dir, i, step)
        done = sdir / "done.json"
        if done.exists():
            ctx.results.append(json.loads(done.read_text()))
            continue
        sdir.mkdir(parents=True, exist_ok=True)
        record = {"step": step.name, "index": i, "options": step.options, "key": keys[i]}
        if step.name == "eval":
            record.update(run_eval(ctx, step.config, sdir))
        elif step.name == "profile":
            record.update(run_profile(ctx, step.config, sdir))
        else:
            record.update(run_method(ctx, step))
            save_model(ctx.model, ctx.tokenizer, sdir / "model", overwrite=True)
        write_json(done, record)  # last: its presence means the step finished
        ctx.results.append(record)
    return ctx.results


def step_dir(run_dir: Path, i: int, step: Step) -> Path:
    return run_dir / f"{i + 1:02d}-{step.name}"


def step_keys(recipe: Recipe) -> list[str]:
    """Per step, a hash of everything its output depends on: the model, data, seed, dtype, and this step's and
    every earlier step's name and options. A finished step is reused only when its key is unchanged."""
    base = {"model": recipe.model, "data": recipe.data, "seed": recipe.seed, "dtype": recipe.dtype}
    keys, chain = [], [json.dumps(base, sort_keys=True, default=str)]
    for step in recipe.steps:
        chain.append(json.dumps({"step": step.name, "options": step.options}, sort_keys=True, default=str))
        keys.append(hashlib.sha256("\n".join(chain).encode()).hexdigest()[:16])
    return keys


def _drop_stale_steps(run_dir: Path, recipe: Recipe, keys: list[str]) -> None:
    """Remove the first finished step whose inputs or options changed since it ran, and every step after it."""
    import shutil
    import sys

    for i, step in enumerate(recipe.steps):
        done = step_dir(run_dir, i, step) / "done.json"
        if not done.exists():
            continue
        try:
            old_key = json.loads(done.read_text()).get("key")
        except (OSError, ValueError):
            old_key = None
        if old_key == keys[i]:
            continue
        print(f"moekit: step {i + 1} ({step.name}) in {run_dir} was run with other inputs or options: running it and "
              "the steps after it again", file=sys.stderr)
        for stale in sorted(run_dir.glob("[0-9][0-9]-*")):
            if stale.is_dir() and int(stale.name[:2]) >= i + 1:
                shutil.rmtree(stale)
        return


def run_method(ctx: Context, step: Step) -> dict:
    """One registered method on the current model; a method that builds a new model makes the old the teacher."""
    from moekit.methods import method

    m = method(step.name)
    cfg = dataclasses.replace(step.config)  # the parsed recipe stays as written
    if hasattr(cfg, "progress"):
        cfg.progress = ctx.progress
    out = m.verb(ctx.model, cfg, **ctx.inputs(step, m.needs, m.uses))
    if m.new_model:
        ctx.teacher, ctx.model = ctx.model, out
        return {}
    return {"report": _as_dict(out)}


def run_profile(ctx: Context, cfg, sdir: Path) -> dict:
    from moekit.profile.plots import write_plots
    from moekit.profile.stats import super_experts

    ctx.stats = None
    stats = ctx.current_stats(cfg)
    stats.save(sdir / "stats.safetensors", overwrite=True)
    figures = [str(p) for p in write_plots(stats, sdir)]
    return {"stats": str(sdir / "stats.safetensors"), "figures": figures,
            "super_experts": [list(p) for p in super_experts(stats)], "tokens": stats.tokens}


def run_eval(ctx: Context, cfg: EvalStep, sdir: Path) -> dict:
    from moekit.core.arch import describe, moe_layers
    from moekit.eval.perplexity import perplexity, windows

    d = ctx.recipe.data
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


def _as_dict(report) -> dict:
    """A JSON-able view of a method's report (tensors become lists, dataclasses dicts)."""
    if report is None:
        return {}
    if dataclasses.is_dataclass(report):
        report = dataclasses.asdict(report)
    if not isinstance(report, dict):
        return {"report": str(report)}
    return json.loads(json.dumps(report, default=_json_default))


def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
