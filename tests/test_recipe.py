"""Recipe validation (every error names its line) and running (profile reuse, resumable runs)."""

from __future__ import annotations

import pytest

from moekit.errors import MoekitError
from moekit.pipeline.recipe import load_recipe

GOOD = """\
model: smollm2-moe
data:
  calib: calib.jsonl
steps:
  - profile: {batch_size: 2}
  - eval:
      ppl_tokens: 2048
"""


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_good_recipe_parses_into_configs(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert [s.name for s in r.steps] == ["profile", "eval"]
    assert r.steps[0].config.batch_size == 2 and r.steps[1].config.ppl_tokens == 2048
    assert [s.line for s in r.steps] == [5, 6]


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("  - profile: {batch_size: 2}", "  - squash: {}"), r"r.yaml:5: unknown step 'squash'"),
    (GOOD.replace("      ppl_tokens: 2048", "      ppl_tokens: 2048\n      bogus: 1"), r"r.yaml:8: step 'eval' has no option 'bogus'"),
    (GOOD.replace("{batch_size: 2}", "{batch_size: 2, tasks: [arc_easy]}"), r"r.yaml:5: .*'tasks' is an option of step 'eval'"),
    (GOOD.replace("data:", "dataa:"), r"r.yaml:2: unknown top-level key 'dataa'"),
    (GOOD.replace("  calib: calib.jsonl", "  calib: calib.jsonl\n  eval_file: x"), r"r.yaml:4: unknown data key 'eval_file'"),
    ("model: x\nsteps: [\n", r"r.yaml:\d+: not valid YAML"),
    ("model: x\nsteps: []\n", r"r.yaml:2: 'steps' must be a non-empty list"),
])
def test_validation_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(MoekitError, match=message):
        load_recipe(write(tmp_path, text))


# ------------------------------------------------------------------------------------------- running
@pytest.fixture()
def tiny_setup(tmp_path, char_tokenizer, monkeypatch):
    """A tiny Qwen2-MoE checkpoint with a tokenizer, calibration and perplexity text, an isolated cache."""
    import json

    from tiny import tiny_model

    from moekit import save_model

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    model = tiny_model("qwen2_moe", vocab_size=len(char_tokenizer))
    save_model(model, char_tokenizer, tmp_path / "model")
    docs = [f"calibration document {i}: " + "the quick brown fox jumps over the lazy dog. " * 3 for i in range(30)]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
model: {tmp_path / 'model'}
data:
  calib: {tmp_path / 'calib.jsonl'}
  eval: {tmp_path / 'calib.jsonl'}
  calib_seqs: 4
  calib_seq_len: 32
steps:
  - profile: {{}}
  - prune: {{criterion: reap, keep: 6}}
  - eval: {{ppl_tokens: 256, ppl_window: 64, speed: false}}
""")
    return tmp_path, recipe


def test_run_writes_every_step_and_a_report(tiny_setup):
    from moekit.pipeline.runner import run_recipe
    from moekit.pipeline.report import write_report

    tmp_path, recipe = tiny_setup
    results = run_recipe(load_recipe(recipe), tmp_path / "run", progress=False)
    assert [r["step"] for r in results] == ["profile", "prune", "eval"]
    assert (tmp_path / "run" / "01-profile" / "stats.safetensors").exists()
    assert (tmp_path / "run" / "02-prune" / "model" / "config.json").exists()
    assert results[2]["model"]["experts_by_layer"] == [6, 6]
    assert results[2]["perplexity"]["value"] > 1
    assert results[1]["report"]["propagate"]  # the recipe's calibration text is at hand: error-propagating scores
    report = write_report(results, tmp_path / "run").read_text()
    assert "prune(criterion=reap, keep=6)" in report and "| 6 |" in report


def test_second_run_reuses_the_cached_profile(tiny_setup, monkeypatch):
    import moekit.profile.profile
    from moekit.pipeline.runner import run_recipe

    tmp_path, recipe = tiny_setup
    run_recipe(load_recipe(recipe), tmp_path / "run1", progress=False)
    calls = []
    real = moekit.profile.profile
    monkeypatch.setattr(moekit.profile, "profile", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_recipe(load_recipe(recipe), tmp_path / "run2", progress=False)
    assert calls == []  # same model, same data, same options: the cached statistics were reused


def test_interrupted_run_leaves_no_half_checkpoint_and_resumes(tiny_setup, monkeypatch):
    import moekit.pipeline.runner as runner

    tmp_path, recipe = tiny_setup
    real_eval = runner.run_eval

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_eval", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_recipe(load_recipe(recipe), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert (run / "02-prune" / "done.json").exists() and not (run / "03-eval" / "done.json").exists()
    assert not [p for p in run.rglob(".*tmp*")]  # no temporary (half-written) directories or files left
    ran = []
    monkeypatch.setattr(runner, "run_method", lambda *a, **k: ran.append("prune") or {})
    monkeypatch.setattr(runner, "run_eval", real_eval)
    results = runner.run_recipe(load_recipe(recipe), run, progress=False)
    assert ran == []  # finished steps are not run again
    assert results[2]["model"]["experts_by_layer"] == [6, 6]  # resumed from the pruned checkpoint


def test_changed_step_is_run_again_not_resumed(tiny_setup, capsys):
    """Rerunning into the same directory with other options redoes the changed step and those after it."""
    from moekit.pipeline.runner import run_recipe

    tmp_path, recipe = tiny_setup
    run = tmp_path / "run"
    first = run_recipe(load_recipe(recipe), run, progress=False)
    assert first[2]["model"]["experts_by_layer"] == [6, 6]
    recipe.write_text(recipe.read_text().replace("keep: 6", "keep: 4, propagate: false"))
    capsys.readouterr()
    second = run_recipe(load_recipe(recipe), run, progress=False)
    assert second[2]["model"]["experts_by_layer"] == [4, 4]  # not the old model
    assert "propagate" in first[1]["report"] and "propagate" not in second[1]["report"]  # one pass, as asked
    assert second[0]["key"] == first[0]["key"] and second[1]["key"] != first[1]["key"]
    assert "step 2 (prune)" in capsys.readouterr().err
    third = run_recipe(load_recipe(recipe), run, progress=False)  # unchanged: everything reused
    assert [r["key"] for r in third] == [r["key"] for r in second]


def test_a_registered_method_is_a_recipe_step_without_touching_the_runner(tmp_path, monkeypatch):
    """The runner looks steps up in the registry: registering a method makes it a step, with its needs supplied."""
    from dataclasses import dataclass

    from moekit.core import registry

    @dataclass
    class ScaleConfig:
        factor: float = 1.0

        def validate(self):
            if self.factor <= 0:
                raise MoekitError("factor must be positive")

    seen = {}

    def scale_(model, cfg, *, stats=None, tokens=None, teacher=None):
        seen.update(tokens=tuple(tokens.shape), stats=stats is not None)
        return {"factor": cfg.factor}

    monkeypatch.setitem(registry.METHODS, "scale", registry.Method("scale", ScaleConfig, scale_, needs=("tokens",)))
    assert load_recipe(write(tmp_path, "model: m\nsteps:\n  - scale: {factor: 2}\n")).steps[0].config.factor == 2
    with pytest.raises(MoekitError, match=r"r.yaml:3: bad options for step 'scale': factor must be positive"):
        load_recipe(write(tmp_path, "model: m\nsteps:\n  - scale: {factor: -1}\n"))
    with pytest.raises(MoekitError, match=r"step 'scale' has no option 'top_k'"):
        load_recipe(write(tmp_path, "model: m\nsteps:\n  - scale: {top_k: 2}\n"))


def test_impossible_combination_is_refused_before_work(tmp_path):
    p = write(tmp_path, "model: m\nsteps:\n  - prune: {keep: 4}\n  - route: {top_k: 6}\n")
    with pytest.raises(MoekitError, match=r"r.yaml:4: top-k 6 is above the 4 experts kept"):
        load_recipe(p)


def test_data_paths_expand_environment_variables(tmp_path, monkeypatch):
    text = "model: smollm2-moe\ndata:\n  calib: $MOEKIT_DATA/calib/c.jsonl\nsteps:\n  - profile: {}\n"
    (tmp_path / "r.yaml").write_text(text)
    monkeypatch.delenv("MOEKIT_DATA", raising=False)
    with pytest.raises(MoekitError, match=r"r.yaml:3: .*MOEKIT_DATA, which is not set"):
        load_recipe(tmp_path / "r.yaml")
    monkeypatch.setenv("MOEKIT_DATA", "/data/here")
    assert load_recipe(tmp_path / "r.yaml").data["calib"] == "/data/here/calib/c.jsonl"


def test_shipped_recipes_parse_and_read_data_from_moekit_data(monkeypatch):
    from moekit.cli.run import RECIPES

    monkeypatch.setenv("MOEKIT_DATA", "/d")
    shipped = sorted(RECIPES.glob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        recipe = load_recipe(path)
        assert all(v.startswith("/d/") for k, v in recipe.data.items() if k in ("calib", "eval", "tasks_dir")
                   and isinstance(v, str) and "/" in v), (path, recipe.data)
