"""Recipe validation (every error names its line) and running (profile reuse, resumable runs)."""

from __future__ import annotations

import pytest

from moekit.errors import MoekitError
from moekit.recipe import load_recipe

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
