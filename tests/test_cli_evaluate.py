"""`moekit eval` and `moekit compare` on a tiny saved model: results written, bad input one line and exit 2."""

from __future__ import annotations

import json

import pytest
from test_evaluate import arc_records, letters_tokenizer, tiny, write_jsonl

from moekit.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_error_line(err: str) -> bool:
    lines = [x for x in err.splitlines() if x.startswith("moekit: error:")]
    return len(lines) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = tiny("qwen3_moe")
    model.save_pretrained(d / "model")
    letters_tokenizer().save_pretrained(d / "model")
    model.save_pretrained(d / "no_tok")
    write_jsonl(d / "arc_easy.jsonl", arc_records())
    return d


def test_eval_writes_result_and_table_then_compare(saved, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run(["eval", str(saved / "model"), "--tasks", "arc_easy", "--data-dir", str(saved),
                             "--limit", "6", "--out", str(out), "--costs"], capsys)
    assert code in (0, None), err
    r = json.loads(out.read_text())
    assert r["tasks"]["arc_easy"]["n"] == 6 and r["settings"]["limit"] == 6
    assert r["costs"]["models"][0]["checkpoint_bytes"] > 0
    assert "arc_easy (acc_norm)" in out.with_suffix(".md").read_text() and "prefill_tokens_per_s" in stdout
    code, _, err = run(["eval", str(saved / "model"), "--tasks", "arc_easy", "--data-dir", str(saved), "--out", str(out)],
                       capsys)
    assert code == 2 and "exists" in err and "--overwrite" in err
    base = tmp_path / "b.json"
    code, stdout, err = run(["eval", str(saved / "model"), "--tasks", "arc_easy", "--data-dir", str(saved), "--limit", "2",
                             "--out", str(base), "--baseline", str(saved / "model")], capsys)
    assert code in (0, None), err
    c = json.loads(base.read_text())["costs"]
    assert c["model_index"] == 1 and len(c["models"]) == 2 and c["ratio"][1]["params_total"] == 1.0
    assert "ratio " in stdout
    code, stdout, err = run(["compare", str(out), str(base), "--plot", str(tmp_path / "c.png")], capsys)
    assert code in (0, None), err
    assert stdout.count(str(saved / "model")) >= 2 and (tmp_path / "c.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--tasks", "arc_eazy"], "unknown task 'arc_eazy'"),
    (["--tasks", "openbookqa"], "openbookqa.jsonl' does not exist"),
    (["--tasks", "arc_easy", "--data-file", "arc_easy"], "is not TASK=PATH"),
    (["--tasks", "arc_easy", "--backend", "tgi"], "unknown backend 'tgi'"),
    (["--tasks", "arc_easy", "--backend", "vllm", "--vllm-python", "/no/such/python"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(saved, tmp_path, capsys, args, message):
    code, _, err = run(["eval", str(saved / "model"), "--data-dir", str(saved), "--out", str(tmp_path / "x.json"), *args],
                       capsys)
    assert code == 2
    assert message in err and one_error_line(err)


def test_malformed_record_and_missing_tokenizer_exit_2(saved, tmp_path, capsys):
    (tmp_path / "arc_easy.jsonl").write_text('{"id": 1}\n')
    code, _, err = run(["eval", str(saved / "model"), "--tasks", "arc_easy", "--data-dir", str(tmp_path),
                        "--out", str(tmp_path / "x.json")], capsys)
    assert code == 2 and "arc_easy.jsonl: line 1: record lacks field(s)" in err and one_error_line(err)
    code, _, err = run(["eval", str(saved / "no_tok"), "--tasks", "arc_easy", "--data-dir", str(saved),
                        "--out", str(tmp_path / "y.json")], capsys)
    assert code == 2 and "tokenizer" in err and one_error_line(err)
