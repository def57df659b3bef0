"""`moekit profile` and `moekit ablate` on tiny saved models: outputs, and one clear line for each bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_model

from moekit.cli import main
from moekit.profile.stats import ExpertStats

TEXT = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(40))


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_line(err: str) -> bool:
    """Exactly one error line, and it is the last thing written (progress bars may precede it)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    return sum(ln.startswith("moekit: error:") for ln in lines) == 1 and lines[-1].startswith("moekit: error:")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, char_tokenizer):
    from moekit import save_model

    root = tmp_path_factory.mktemp("cli")
    save_model(tiny_model("qwen2_moe", vocab_size=128), char_tokenizer, root / "moe", verify=False)
    save_model(tiny_model("qwen2_moe", seed=1, vocab_size=128), char_tokenizer, root / "other", verify=False)
    save_model(tiny_model("llama", vocab_size=128), char_tokenizer, root / "dense", verify=False)
    (root / "data.txt").write_text(TEXT)
    (root / "short.txt").write_text("too short")
    return root


def test_profile_writes_stats_and_plots(saved, capsys, tmp_path):
    from moekit.checkpoint.load import load_model

    out = tmp_path / "stats.safetensors"
    args = ["profile", str(saved / "moe"), "--data", str(saved / "data.txt"), "--out", str(out), "--n-seq", "4",
            "--seq-len", "32", "--device", "cpu", "--gram", "8", "--attn-sink", "--plots", str(tmp_path / "plots")]
    code, text, err = run(args, capsys)
    assert code in (0, None), err
    assert "profiled 2 MoE layers on 128 tokens" in text
    stats = ExpertStats.load(out)
    model, _ = load_model(str(saved / "moe"), device="cpu")
    stats.check_model(model)
    assert {"gram", "attn_sink", "rank_counts", "hidden_max"} <= set(stats.collected)
    assert stats.meta["data"]["n_seq"] == 4 and stats.meta["data"]["seq_len"] == 32
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3
    # an existing file is not overwritten silently
    code, _, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err and one_line(err)
    # the stream mode gives the same statistics
    s_out = tmp_path / "stream.safetensors"
    s_args = [a if a != str(out) else str(s_out) for a in args if a != "--plots" and a != str(tmp_path / "plots")]
    code, _, err = run([*s_args, "--stream"], capsys)
    assert code in (0, None), err
    streamed = ExpertStats.load(s_out)
    for key, value in stats.tensors.items():
        torch.testing.assert_close(streamed.tensors[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_profile_bad_input_one_line_each(saved, capsys, tmp_path):
    base = ["--out", str(tmp_path / "s.safetensors"), "--device", "cpu", "--n-seq", "2", "--seq-len", "32"]
    code, _, err = run(["profile", str(saved / "dense"), "--data", str(saved / "data.txt"), *base], capsys)
    assert code == 2 and "dense model" in err and "moekit carve" in err and one_line(err)
    code, _, err = run(["profile", str(saved / "moe"), "--data", str(saved / "short.txt"), *base], capsys)
    assert code == 2 and "fewer than one sequence" in err and one_line(err)
    code, _, err = run(["profile", str(saved / "dense"), "--data", str(saved / "data.txt"), "--stream", *base], capsys)
    assert code == 2 and "moekit carve" in err and one_line(err)


def test_ablate_cli(saved, capsys, tmp_path):
    other = tmp_path / "other.safetensors"
    code, _, err = run(["profile", str(saved / "other"), "--data", str(saved / "data.txt"), "--out", str(other),
                        "--n-seq", "2", "--seq-len", "32", "--device", "cpu"], capsys)
    assert code in (0, None), err
    common = ["--data", str(saved / "data.txt"), "--max-tokens", "256", "--window", "64", "--device", "cpu"]
    code, _, err = run(["ablate", str(saved / "moe"), *common, "--super-experts", "--stats", str(other)], capsys)
    assert code == 2 and "another model" in err and one_line(err)
    code, _, err = run(["ablate", str(saved / "moe"), *common], capsys)
    assert code == 2 and "exactly one of" in err
    res = tmp_path / "ablate.json"
    code, text, err = run(["ablate", str(saved / "moe"), *common, "--experts", "0,1;1,3", "--json", str(res)], capsys)
    assert code in (0, None), err
    assert "ablated: experts [(0, 1), (1, 3)]" in text and "random control" in text
    d = json.loads(res.read_text())
    assert d["ablated"]["experts"] == [[0, 1], [1, 3]] and len(d["random control"]["experts"]) == 2
    assert d["ablated"]["ppl_before"] == d["random control"]["ppl_before"]
    assert len(d["ablated"]["d_sink"]) == 2


def test_ablate_layer_by_layer_equals_in_memory(saved, capsys, tmp_path):
    """--mode sequential reads one decoder layer at a time: the same perplexities and sink decay as in memory."""
    common = ["--data", str(saved / "data.txt"), "--max-tokens", "256", "--window", "64", "--device", "cpu",
              "--experts", "0,1;1,3", "--dtype", "float32"]
    got = {}
    for mode in ("memory", "sequential"):
        code, _, err = run(["ablate", str(saved / "moe"), *common, "--mode", mode, "--json", str(tmp_path / mode)], capsys)
        assert code in (0, None), err
        got[mode] = json.loads((tmp_path / mode).read_text())
    for run_name in ("ablated", "random control"):
        mem, seq = got["memory"][run_name], got["sequential"][run_name]
        assert mem["experts"] == seq["experts"]
        assert mem["ppl_after"] != mem["ppl_before"]  # the ablation changes something
        for key in ("ppl_before", "ppl_after"):
            assert seq[key] == pytest.approx(mem[key], rel=1e-4), (run_name, key)
        assert seq["d_sink"] == pytest.approx(mem["d_sink"], abs=1e-4)
    code, _, err = run(["ablate", str(saved / "moe"), *common[:-4], "--experts", "0,99", "--mode", "sequential"], capsys)
    assert code == 2 and "no expert 99" in err and one_line(err)
    other = tmp_path / "other.safetensors"
    code, _, err = run(["profile", str(saved / "other"), "--data", str(saved / "data.txt"), "--out", str(other),
                        "--n-seq", "2", "--seq-len", "32", "--device", "cpu"], capsys)
    code, _, err = run(["ablate", str(saved / "moe"), *common[:-4], "--super-experts", "--stats", str(other),
                        "--mode", "sequential"], capsys)
    assert code == 2 and "another model" in err and one_line(err)
