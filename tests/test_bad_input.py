"""Bad input that used to pass silently or replace files: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
from merge_helpers import tiny_stats
from tiny import ids, tiny_model

from moekit.checkpoint.save import save_model
from moekit.errors import MoekitError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, char_tokenizer):
    root = tmp_path_factory.mktemp("bad")
    model = tiny_model("qwen3_moe", vocab_size=len(char_tokenizer), max_position_embeddings=256)
    save_model(model, char_tokenizer, root / "model")
    tiny_stats(model, ids(vocab=len(char_tokenizer), batch=4, length=16)).save(root / "stats.safetensors")
    (root / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return root


def one_error(err: str) -> bool:
    """One error line and no traceback (progress bars may come before it)."""
    return sum(line.startswith("moekit: error:") for line in err.splitlines()) == 1 and "Traceback" not in err


def test_merge_target_not_below_the_expert_count_is_refused(saved, tmp_path, cli):
    code, _, err = cli("merge", saved / "model", "--stats", saved / "stats.safetensors", "--target", 30,
                       "--out", tmp_path / "o")
    assert code == 2 and one_error(err) and "--target 30 is not below" in err, err
    assert not (tmp_path / "o").exists()


def test_non_finite_saliency_in_statistics_is_refused(saved, tmp_path):
    from moekit import load_model
    from moekit.profile.stats import ExpertStats
    from moekit.prune.prune import PruneConfig, prune_

    stats = ExpertStats.load(saved / "stats.safetensors")
    layer = stats.layers[0]
    stats.tensors[f"reap_sum.{layer}"] = stats.get("reap_sum", layer).clone()
    stats.tensors[f"reap_sum.{layer}"][3] = float("nan")
    model, _ = load_model(str(saved / "model"), with_tokenizer=False)
    with pytest.raises(MoekitError, match=r"non-finite 'reap' scores \(experts \[3\]\)"):
        prune_(model, PruneConfig(criterion="reap", keep=4), stats=stats)


@pytest.mark.parametrize("args, words", [
    (["--max-tokens", "0"], "--max-tokens 0 must be at least one window"),
    (["--window", "1"], "--window 1 must be at least 2"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
])
def test_ppl_impossible_numbers(saved, cli, args, words):
    code, _, err = cli("ppl", saved / "model", "--data", saved / "text.txt", "--window", 64, *args)
    assert code == 2 and one_error(err) and words in err, err


def test_eval_does_not_replace_the_markdown_beside_its_json(saved, tmp_path, cli):
    (tmp_path / "r.md").write_text("mine")
    record = {"id": "1", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    (tmp_path / "arc.jsonl").write_text(json.dumps(record) + "\n")
    code, _, err = cli("eval", saved / "model", "--tasks", "arc_easy", "--data-file", f"arc_easy={tmp_path / 'arc.jsonl'}",
                       "--out", tmp_path / "r.json")
    assert code == 2 and one_error(err) and "r.md' exists" in err
    assert (tmp_path / "r.md").read_text() == "mine"


def test_compare_does_not_replace_an_existing_plot(tmp_path, cli):
    result = {"schema": "moekit.eval/1", "model": {"name": "m", "params": {"total": 10, "active": 5}},
              "tasks": {"arc_easy": {"summary": 0.5, "summary_metric": "acc_norm", "acc": 0.5, "acc_norm": 0.5, "n": 10}}}
    (tmp_path / "a.json").write_text(json.dumps(result))
    (tmp_path / "plot.png").write_bytes(b"mine")
    code, _, err = cli("compare", tmp_path / "a.json", "--plot", tmp_path / "plot.png")
    assert code == 2 and one_error(err) and "plot.png' exists" in err
    assert (tmp_path / "plot.png").read_bytes() == b"mine"

