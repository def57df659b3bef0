"""Checkpoints and the engines that serve them: forms, the q/k/v-bias repair, and `serve-check` in a real vLLM.

The tests marked ``vllm`` run vLLM's offline engine (the separate environment of `moekit vllm-env`) on every
standard form moekit writes, derived from the embedded default ``smollm2-moe``; they skip with the reason when
there is no vLLM environment (CI creates one first: .ci/run).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA, needs_data
from tiny import ids, tiny_model

from moekit.checkpoint.forms import checkpoint_form, repair_for_engines
from moekit.checkpoint.save import save_model
from moekit.errors import MoekitError


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _write_config(path, **config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"")


# ---------------------------------------------------------------------------------------------- forms, no engine
def test_repair_adds_zero_qkv_biases_and_keeps_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2_moe", qkv_bias=False)
    x = ids()
    before = logits(model, x)
    model.save_pretrained(tmp_path / "old")  # the form moekit wrote before: vLLM runs it with garbage biases
    assert not checkpoint_form(tmp_path / "old").servable
    assert "qkv_bias false" in checkpoint_form(tmp_path / "old").reason
    assert repair_for_engines(model, quiet=True)
    assert model.config.qkv_bias is True
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, n).bias is not None and not getattr(attn, n).bias.any() for n in ("q_proj", "k_proj", "v_proj"))
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=0)
    assert not repair_for_engines(model, quiet=True)  # nothing left to repair
    save_model(model, None, tmp_path / "new")
    assert checkpoint_form(tmp_path / "new").servable
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "new").eval()
    torch.testing.assert_close(logits(reloaded, x), before, rtol=0, atol=1e-6)


def test_loading_the_old_form_repairs_it_and_says_so(tmp_path, capsys):
    from moekit import load_model

    tiny_model("qwen2_moe", qkv_bias=False).save_pretrained(tmp_path / "old")
    capsys.readouterr()
    model, _ = load_model(str(tmp_path / "old"), with_tokenizer=False)
    assert model.config.qkv_bias is True
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moekit:")]
    assert len(lines) == 1 and "added zero biases" in lines[0]


def test_saving_writes_the_form_every_engine_reads(tmp_path):
    model = tiny_model("qwen2_moe", qkv_bias=False)
    before = logits(model, ids())
    save_model(model, None, tmp_path / "m")  # verified: the reload computes what the model did
    assert checkpoint_form(tmp_path / "m").servable
    assert json.loads((tmp_path / "m" / "config.json").read_text())["qkv_bias"] is True
    torch.testing.assert_close(logits(model, ids()), before, rtol=0, atol=0)


def test_carving_writes_zero_qkv_biases():
    from moekit.carve.carve import CarveConfig, carve

    dense = tiny_model("llama")
    moe = carve(dense, CarveConfig(experts=8, shared=2, active=2, k_a=4), tokens=ids(batch=4, length=32), progress=False)
    assert moe.config.model_type == "qwen2_moe" and moe.config.qkv_bias is True
    q = moe.model.layers[0].self_attn.q_proj
    assert q.bias is not None and not q.bias.any()


@pytest.mark.parametrize("keys, servable, words", [
    ({"model_type": "qwen3_moe"}, True, ""),
    ({"model_type": "qwen2_moe", "qkv_bias": True}, True, ""),
    ({"model_type": "qwen2_moe"}, False, "qkv_bias false"),
    ({"model_type": "qwen3_moe", "moekit_top_k_per_layer": {"0": 2, "1": 4}}, False, "top-k per layer"),
    ({"model_type": "qwen3_moe", "moekit_experts_per_layer": {"0": 6, "1": 8}}, False, "moekit uniform"),
    ({"model_type": "qwen3_moe", "moekit_route": {"0": {}}}, False, "routing rule"),
])
def test_form_from_the_files(tmp_path, keys, servable, words):
    _write_config(tmp_path / "c", **keys)
    form = checkpoint_form(tmp_path / "c")
    assert form.servable is servable
    assert words in form.line()


def test_moekit_form_is_not_servable_and_info_says_so(tmp_path, cli, char_tokenizer):
    from moekit.core.arch import moe_layers

    model = tiny_model("qwen3_moe", vocab_size=len(char_tokenizer))
    moe_layers(model)[0].set_top_k(1)  # per-layer top-k: moekit's form
    save_model(model, char_tokenizer, tmp_path / "m")
    form = checkpoint_form(tmp_path / "m")
    assert form.name == "moekit" and not form.servable and "moekit route" in form.fix
    code, out, err = cli("info", tmp_path / "m", "--json")
    assert code == 0, err
    assert "not servable by vLLM" in json.loads(out)["form"]
    save_model(tiny_model("qwen3_moe", vocab_size=len(char_tokenizer)), char_tokenizer, tmp_path / "std")
    code, out, _ = cli("info", tmp_path / "std", "--json")
    assert json.loads(out)["form"].startswith("standard (plain transformers loads it; vLLM serves it)")


def test_the_earlier_name_of_moekit_form_still_loads(tmp_path):
    from moekit import load_model
    from moekit.checkpoint.paths import LEGACY_NON_UNIFORM_WEIGHTS, NON_UNIFORM_WEIGHTS
    from moekit.core.arch import moe_layers

    model = tiny_model("qwen3_moe")
    moe_layers(model)[1].keep_experts([0, 2, 5])
    save_model(model, None, tmp_path / "m")
    (tmp_path / "m" / NON_UNIFORM_WEIGHTS).rename(tmp_path / "m" / LEGACY_NON_UNIFORM_WEIGHTS)
    back, _ = load_model(str(tmp_path / "m"), with_tokenizer=False)
    assert [layer.num_experts for layer in moe_layers(back)] == [8, 3]
    torch.testing.assert_close(logits(back, ids()), logits(model, ids()), rtol=0, atol=0)
    assert checkpoint_form(tmp_path / "m").name == "moekit"


def test_serve_check_refuses_unservable_forms_without_starting_vllm(tmp_path, monkeypatch):
    from moekit.serve.check import serve_check

    monkeypatch.setenv("MOEKIT_VLLM_PYTHON", str(tmp_path / "no-such-python"))  # would fail if it were used
    model = tiny_model("qwen3_moe")
    for layer in __import__("moekit").moe_layers(model)[:1]:
        layer.keep_experts([0, 1, 2, 3])
    save_model(model, None, tmp_path / "nonuniform")
    (v,) = serve_check([tmp_path / "nonuniform"])
    assert not v.ok and v.form == "moekit" and "moekit uniform" in v.reason


def test_engine_args_parse_json_and_pairs():
    from moekit.cli.common import engine_args

    assert engine_args('{"tensor_parallel_size": 2}') == {"tensor_parallel_size": 2}
    assert engine_args("tensor_parallel_size=2,kv_cache_dtype=fp8") == {"tensor_parallel_size": 2, "kv_cache_dtype": "fp8"}
    with pytest.raises(MoekitError, match="key=value"):
        engine_args("tensor_parallel_size")
    with pytest.raises(MoekitError, match="not valid JSON"):
        engine_args("{bad")


def test_missing_vllm_environment_is_one_line(tmp_path, monkeypatch):
    from moekit.serve.vllm_env import find_vllm_python

    monkeypatch.delenv("MOEKIT_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    with pytest.raises(MoekitError, match="moekit vllm-env"):
        find_vllm_python()
    with pytest.raises(MoekitError, match="--vllm-python"):
        find_vllm_python(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- the real engine
def engine_processes() -> set[int]:
    """Live vLLM engine-core processes (their title is VLLM::EngineCore)."""
    import psutil

    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        if "EngineCor" in (p.info["name"] or "") or any("EngineCore" in c for c in p.info["cmdline"] or ()):
            found.add(p.pid)
    return found


@pytest.mark.vllm
@pytest.mark.slow
def test_every_standard_form_serves_identically_in_vllm(served_forms, vllm_python, tmp_path):
    from moekit.serve.check import ServeCheckConfig, serve_check

    names = list(served_forms)
    before = engine_processes()
    verdicts = serve_check([served_forms[n] for n in names], ServeCheckConfig(), vllm_python=vllm_python)
    assert engine_processes() <= before  # the worker left no engine behind
    report = {n: v.line() for n, v in zip(names, verdicts, strict=True)}
    assert all(v.ok for v in verdicts), report
    assert all(v.steps == 4 * 32 for v in verdicts)
    # near-ties aside, vLLM reproduces transformers' own greedy text
    assert all(v.greedy_match >= 0.9 * v.steps for v in verdicts), report


@pytest.mark.vllm
@pytest.mark.slow
def test_the_old_qkv_form_breaks_in_vllm_and_serve_check_catches_it(tmp_path, smollm2_moe, vllm_python, cli):
    """The NaN case: the embedded default as recipe v1 wrote it (Qwen2-MoE, qkv_bias false)."""
    from transformers import AutoModelForCausalLM

    from moekit.serve.check import ServeCheckConfig, compare, prompt_ids, run_vllm

    path, _, tok = smollm2_moe
    plain = AutoModelForCausalLM.from_pretrained(path)
    for layer in plain.model.layers:
        for n in ("q_proj", "k_proj", "v_proj"):
            getattr(layer.self_attn, n).bias = None
    plain.config.qkv_bias = False
    plain.save_pretrained(tmp_path / "v1-form")
    tok.save_pretrained(tmp_path / "v1-form")
    code, out, err = cli("serve-check", tmp_path / "v1-form", "--vllm-python", vllm_python)  # refused from the files
    assert code == 2 and "qkv_bias false" in out and err.startswith("moekit: error:")
    # the same model in moekit's own form (per-layer top-k): vLLM must not find weights to load by mistake
    from moekit.checkpoint.load import load_model
    from moekit.core.arch import moe_layers

    model, _ = load_model(str(path), with_tokenizer=False)
    moe_layers(model)[0].set_top_k(4)
    save_model(model, tok, tmp_path / "moekit-form", verify=False)
    cfg = ServeCheckConfig(check_form=False, max_tokens=4, prompts=2)
    prompts = prompt_ids(tmp_path / "v1-form", cfg.prompts, plain.config.vocab_size)
    requests = [{"model": str(p), "prompts": prompts, "max_tokens": cfg.max_tokens, "logprobs": 1, "dtype": cfg.dtype,
                 "engine": {"gpu_memory_utilization": cfg.gpu_memory_utilization}}
                for p in (tmp_path / "v1-form", tmp_path / "moekit-form")]
    old, own = run_vllm(requests, vllm_python, cfg.timeout_s)
    v = compare(tmp_path / "v1-form", prompts, old, cfg)
    assert not v.ok and ("non-finite" in v.reason or "log-probability" in v.reason), v.line()
    assert "error" in own, own  # no *.safetensors: vLLM refuses to load it


@pytest.mark.vllm
@pytest.mark.slow
@needs_data
def test_eval_through_vllm_scores_the_same_items_as_in_process(smollm2_moe, vllm_python, tmp_path, cli):
    """`moekit eval --backend vllm` (the harness's vLLM backend, in the vLLM environment) against the HF backend."""
    path, _, _ = smollm2_moe
    args = ["eval", path, "--tasks", "arc_easy,openbookqa,social_iqa", "--data-dir", DATA / "dev", "--limit", "50",
            "--ppl-data", DATA / "dev" / "c4_valid_dev.jsonl", "--ppl-tokens", "1024", "--ppl-window", "512"]
    code, _, err = cli(*args, "--out", tmp_path / "hf.json")
    assert code == 0, err
    before = engine_processes()
    code, _, err = cli(*args, "--backend", "vllm", "--vllm-python", vllm_python, "--model-args",
                       "gpu_memory_utilization=0.15,max_model_len=1024", "--out", tmp_path / "vllm.json")
    assert code == 0, err
    assert engine_processes() <= before  # the harness's engine is not shut down by lm-eval: the worker stops it
    hf, vl = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("hf", "vllm"))
    assert vl["settings"]["backend"] == "vllm"
    # beside vLLM, the perplexity is computed in this process one decoder layer at a time: the in-memory value
    assert vl["perplexity"]["mode"] == "sequential" and vl["perplexity"]["tokens"] == hf["perplexity"]["tokens"] == 1024
    assert vl["perplexity"]["value"] == pytest.approx(hf["perplexity"]["value"], rel=1e-4)
    for task, h in hf["tasks"].items():
        v = vl["tasks"][task]
        assert v["n"] == h["n"] == 50
        for metric in ("acc", "acc_norm"):
            if h.get(metric) is not None:
                assert abs(v[metric] - h[metric]) * h["n"] <= max(1, h["n"] / 100) + 1e-9, (task, metric, h[metric], v[metric])
