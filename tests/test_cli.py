"""The command line: help everywhere, one-line errors with exit status 2."""

from __future__ import annotations

import pytest
from tiny import tiny_model

from moekit.cli import app, main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_help_on_every_subcommand(capsys):
    import typer.main

    names = [c.name for c in typer.main.get_command(app).commands.values()]
    assert {"info", "ppl"} <= set(names)
    for name in names:
        code, out, _ = run([name, "--help"], capsys)
        assert code == 0 and "Usage" in out, name


def test_missing_model_is_one_line_exit_2(capsys, tmp_path):
    code, _, err = run(["info", str(tmp_path / "nope")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "does not exist" in err


def test_ppl_without_tokenizer_is_refused(capsys, tmp_path):
    from moekit import save_model

    save_model(tiny_model("qwen2_moe"), None, tmp_path / "m", verify=False)
    code, _, err = run(["ppl", str(tmp_path / "m"), "--data", "self"], capsys)
    assert code == 2 and "has no tokenizer" in err and "save the tokenizer" in err


def test_info_json(capsys, tmp_path, char_tokenizer):
    import json

    from moekit import save_model

    save_model(tiny_model("qwen2_moe"), char_tokenizer, tmp_path / "m", verify=False)
    code, out, _ = run(["info", str(tmp_path / "m"), "--json", "--device", "cpu"], capsys)
    assert code in (0, None)
    d = json.loads(out)
    assert d["moe_layers"] == 2 and d["experts_per_layer"] == [8] and d["shared_experts"] is True
