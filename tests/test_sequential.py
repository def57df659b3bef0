"""The layer-sequential engine: every method gives what its in-memory path gives (tensors and logits), on tiny models
of every family, written in transformers' names and shards."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moekit.checkpoint.load import load_model
from moekit.profile.profile import ProfileConfig, profile
from tiny import ALL_MOE_FAMILIES, MOE_FAMILIES, ids, tiny_model

# families whose decoder layers pass an indexer's top-k from layer to layer: refused by the layer-sequential mode
STATEFUL_LAYERS = ("glm_moe_dsa", "hy_v4")
CPU = dict(device="cpu", dtype=torch.float32, progress=False)


def _saved(tmp_path_factory, family):
    path = tmp_path_factory.mktemp(family) / "src"
    model = tiny_model(family)
    model.save_pretrained(path)
    tokens = ids(batch=6, length=10)
    stats = profile(model, ProfileConfig(progress=False, gram_tokens=30), tokens=tokens)
    return path, model, tokens, stats


# the classic six, and NemotronH: a hybrid whose checkpoint names its body ``backbone.`` and whose experts are ungated
SEQUENTIAL_FAMILIES = (*MOE_FAMILIES, "nemotron_h")


@pytest.fixture(scope="module", params=SEQUENTIAL_FAMILIES)
def saved(request, tmp_path_factory):
    """(checkpoint folder, in-memory model, calibration tokens, statistics) of one family's tiny model."""
    return _saved(tmp_path_factory, request.param)


def reload(path):
    return load_model(str(path), dtype=torch.float32, device="cpu", with_tokenizer=False)[0]


def assert_same_model(a, b):
    """Same tensors under the same names, and the same logits."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0, msg=key)
    x = ids(batch=2, length=8)  # same weights; a kernel may still pick another reduction order for a fresh tensor
    torch.testing.assert_close(b(x).logits, a(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", ["uniform", "global"])
def test_prune_sequential_equals_in_memory(saved, budget, tmp_path):
    from moekit.errors import MoekitError
    from moekit.prune.prune import PruneConfig, prune_
    from moekit.prune.sequential import prune_sequential

    path, model, _, stats = saved
    mem = copy.deepcopy(model)
    try:
        expected = prune_(mem, PruneConfig(ratio=0.25, budget=budget), stats=stats)
    except MoekitError as e:  # group-limited routing refuses a global budget, in both modes
        with pytest.raises(MoekitError, match=str(e)[:40]):
            prune_sequential(path, PruneConfig(ratio=0.25, budget=budget), tmp_path / "out", stats=stats, **CPU)
        return
    report = prune_sequential(path, PruneConfig(ratio=0.25, budget=budget), tmp_path / "out", stats=stats, **CPU)
    assert [r["kept"] for r in report["layers"]] == [r["kept"] for r in expected["layers"]]
    assert_same_model(mem, reload(tmp_path / "out"))


@pytest.mark.parametrize("mitigations", [(), ("rescale",), ("compensate",)])
def test_route_sequential_equals_in_memory(saved, mitigations, tmp_path):
    from moekit.route.route import RouteConfig, route_
    from moekit.route.sequential import route_sequential

    path, model, tokens, stats = saved
    mem = copy.deepcopy(model)
    expected = route_(mem, RouteConfig(top_k=1, mitigations=mitigations), stats=stats, tokens=tokens)
    report = route_sequential(path, RouteConfig(top_k=1, mitigations=mitigations), tmp_path / "out", stats=stats,
                              tokens=tokens, **CPU)
    assert report["scales"] == expected["scales"]
    assert report["form"] == expected["form"]
    assert_same_model(mem, reload(tmp_path / "out"))


def test_route_sequential_refuses_cross_layer_mitigations(saved, tmp_path):
    from moekit.errors import MoekitError
    from moekit.route.route import RouteConfig
    from moekit.route.sequential import route_sequential

    path, _, tokens, stats = saved
    with pytest.raises(MoekitError, match="--mode memory"):
        route_sequential(path, RouteConfig(top_k=1.5, mitigations=("allocate",)), tmp_path / "out", stats=stats,
                         tokens=tokens, **CPU)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("learn", [False, True])
def test_merge_sequential_equals_in_memory(saved, learn, tmp_path):
    from moekit.merge.merge import MergeConfig, merge_
    from moekit.merge.sequential import merge_sequential

    path, model, tokens, stats = saved
    n = model.config.to_dict().get("num_experts") or model.config.to_dict().get("num_local_experts") \
        or model.config.n_routed_experts
    cfg = dict(target=n // 2, learn=learn, steps=4)
    mem = copy.deepcopy(model)
    expected = merge_(mem, MergeConfig(**cfg), stats=stats, tokens=tokens)
    report = merge_sequential(path, MergeConfig(**cfg), tmp_path / "out", stats=stats, tokens=tokens, **CPU)
    assert [r["groups"] for r in report["layers"]] == [r["groups"] for r in expected["layers"]]
    assert_same_model(mem, reload(tmp_path / "out"))


def test_densify_sequential_equals_in_memory(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    from moekit.core.arch import MOE_FAMILIES as FAMILIES
    from moekit.densify.densify import DensifyConfig, densify
    from moekit.densify.sequential import densify_sequential

    path, model, tokens, stats = saved
    if FAMILIES[model.config.model_type].dense_model_type is None:
        pytest.skip(f"{model.config.model_type} has no dense twin")
    mem = densify(copy.deepcopy(model), DensifyConfig(keep=2, shared_gate="mean"), stats=stats, tokens=tokens)
    densify_sequential(path, DensifyConfig(keep=2, shared_gate="mean"), tmp_path / "out", stats=stats, tokens=tokens,
                       **CPU)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert type(back) is type(mem)
    assert_same_model(mem, back)


def test_perplexity_sequential_equals_in_memory(saved):
    from moekit.eval.perplexity import perplexity, perplexity_sequential

    path, model, tokens, _ = saved
    mem = perplexity(model, tokens, batch_size=4, progress=False)
    seq = perplexity_sequential(path, tokens, batch_size=4, **CPU)
    assert seq == pytest.approx(mem, rel=1e-6)


@pytest.mark.parametrize("family", ALL_MOE_FAMILIES)
def test_every_family_profiles_and_prunes_layer_by_layer(family, tmp_path_factory, tmp_path):
    """Every supported family (hybrid ones included: their Mamba / linear-attention layers run as they are)."""
    from moekit.errors import MoekitError
    from moekit.prune.prune import PruneConfig, prune_
    from moekit.prune.sequential import prune_sequential
    from moekit.profile.stream import profile_stream

    path, model, tokens, stats = _saved(tmp_path_factory, family)
    if family in STATEFUL_LAYERS:
        with pytest.raises(MoekitError, match="more than the hidden states"):
            profile_stream(path, tokens, ProfileConfig(progress=False), device="cpu", dtype=torch.float32)
        return
    streamed = profile_stream(path, tokens, ProfileConfig(progress=False, gram_tokens=30), device="cpu",
                              dtype=torch.float32)
    assert streamed.meta["fingerprint"] == stats.meta["fingerprint"]
    for key, value in stats.tensors.items():
        torch.testing.assert_close(streamed.tensors[key], value, rtol=1e-4, atol=1e-5, msg=key)
    mem = copy.deepcopy(model)
    prune_(mem, PruneConfig(ratio=0.25), stats=stats)
    prune_sequential(path, PruneConfig(ratio=0.25), tmp_path / "out", stats=stats, **CPU)
    assert_same_model(mem, reload(tmp_path / "out"))


def test_shards_and_index(tmp_path_factory, tmp_path):
    """Shards no larger than asked, transformers' names and index; plain transformers loads the result."""
    from transformers import AutoModelForCausalLM

    from moekit.outputs import staged_dir
    from moekit.sequential.engine import LayerSequential

    path, model, _, _ = _saved(tmp_path_factory, "qwen3_moe")
    engine = LayerSequential(path, **CPU)
    with staged_dir(tmp_path / "out", False) as tmp:
        engine.write_to(tmp, max_shard_bytes=40_000)
        for _ in engine:
            pass
        engine.finish()
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    biggest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    assert all((out / s).stat().st_size <= max(40_000, biggest) + 20_000 for s in shards)
    assert not [p for p in out.iterdir() if p.name.startswith(".part")]
    back, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert_same_model(model, back)


def test_failure_mid_walk_leaves_nothing(tmp_path_factory, tmp_path):
    from moekit.outputs import staged_dir
    from moekit.sequential.engine import LayerSequential

    path, _, _, _ = _saved(tmp_path_factory, "mixtral")
    engine = LayerSequential(path, **CPU)
    with pytest.raises(RuntimeError, match="boom"), staged_dir(tmp_path / "out", False) as tmp:
        engine.write_to(tmp)
        for layer in engine:
            if layer.index == 1:
                raise RuntimeError("boom")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- weights as users have them
def _synthetic(tmp_path_factory, fp8: bool):
    from moekit.checkpoint.synthetic import QWEN3_30B_A3B, write_synthetic

    tiny = {**QWEN3_30B_A3B, "hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 8,
            "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1}
    return write_synthetic(tmp_path_factory.mktemp("fp8" if fp8 else "bf16") / "src", tiny, num_layers=2, fp8=fp8,
                           progress=False)


def test_fp8_checkpoint_is_pruned_dequantized(tmp_path_factory, tmp_path, capsys):
    """An FP8 block-scaled checkpoint (DeepSeek-V3 / Qwen3-FP8 layout) is read one layer at a time, dequantized, and
    written in bf16 with the same experts kept as pruning the dequantized model in memory."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from moekit.checkpoint.safetensors_io import CheckpointReader
    from moekit.profile.stream import profile_stream
    from moekit.prune.prune import PruneConfig, prune_
    from moekit.prune.sequential import prune_sequential

    src = _synthetic(tmp_path_factory, fp8=True)
    tokens = ids(vocab=512, batch=4, length=12)
    stats = profile_stream(src, tokens, ProfileConfig(progress=False), device="cpu", dtype=torch.float32)
    prune_sequential(src, PruneConfig(ratio=0.25), tmp_path / "out", stats=stats, **CPU)
    assert "in bfloat16 dequantized from FP8" in capsys.readouterr().err
    from transformers import AutoConfig

    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert AutoConfig.from_pretrained(tmp_path / "out").num_experts == 6
    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
        assert not [k for k in names if k.endswith("scale_inv")]
    # the in-memory reference: the dequantized weights in a plain model of the same config
    reader = CheckpointReader(src)
    ref_config = AutoConfig.from_pretrained(src)
    ref_config.quantization_config = None
    ref = AutoModelForCausalLM.from_config(ref_config)
    from moekit.checkpoint.names import to_model_names

    state = to_model_names(ref, {k: reader.tensor(k, torch.bfloat16).float() for k in reader.where
                                 if not k.endswith("_scale_inv")})
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    ref.tie_weights()
    from moekit.profile.stats import fingerprint

    stats.meta["fingerprint"] = fingerprint(ref)  # the same model without its quantization_config
    prune_(ref, PruneConfig(ratio=0.25), stats=stats)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key].float(), value.float(), rtol=0, atol=0, msg=key)


def test_multi_token_prediction_layer_dropped_with_a_line(tmp_path_factory, tmp_path, caplog):
    """DeepSeek-V3 stores its MTP module as one more decoder layer beyond num_hidden_layers: never copied unpruned."""
    from safetensors.torch import save_file

    from moekit.checkpoint.safetensors_io import CheckpointReader
    from moekit.prune.prune import PruneConfig
    from moekit.prune.sequential import prune_sequential

    path, model, _, stats = _saved(tmp_path_factory, "deepseek_v3")
    n = model.config.num_hidden_layers
    last = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): v for k, v in CheckpointReader(path).read("").items()
            if k.startswith(f"model.layers.{n - 1}.")}
    save_file(last, str(path / "mtp.safetensors"))
    try:
        with caplog.at_level("WARNING", logger="moekit"):
            prune_sequential(path, PruneConfig(ratio=0.25), tmp_path / "out", stats=stats, **CPU)
        assert f"dropping decoder layers [{n}]" in caplog.text
        assert not CheckpointReader(tmp_path / "out").extra_layers(n)
    finally:
        (path / "mtp.safetensors").unlink()


# ---------------------------------------------------------------------------------------------- the command line
def test_cli_mode_sequential_equals_memory(tmp_path_factory, tmp_path, char_tokenizer, monkeypatch):
    """`--mode sequential` and `--mode memory` write the same checkpoint; `--mode auto` goes layer by layer, saying
    so, when the model does not fit in the memory free."""
    from safetensors.torch import load_file

    from moekit.cli import main
    import moekit.core.device as device

    path, model, _, _ = _saved(tmp_path_factory, "qwen3_moe")
    char_tokenizer.save_pretrained(path)
    text = tmp_path / "calib.txt"
    text.write_text("Mixture-of-experts models route each token to a few experts. " * 40)

    def run(*argv):
        monkeypatch.setattr("sys.argv", ["moekit", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 0

    run("profile", str(path), "--data", str(text), "--n-seq", "4", "--seq-len", "16", "--out", str(tmp_path / "s.st"))
    for mode in ("memory", "sequential"):
        run("prune", str(path), "--stats", str(tmp_path / "s.st"), "--ratio", "0.25", "--mode", mode,
            "--out", str(tmp_path / mode))
    a, b = load_file(tmp_path / "memory" / "model.safetensors"), load_file(tmp_path / "sequential" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for mode in ("memory", "sequential"):  # with --data the scores are error-propagating, in either mode
        run("prune", str(path), "--stats", str(tmp_path / "s.st"), "--ratio", "0.5", "--mode", mode, "--data", str(text),
            "--n-seq", "4", "--seq-len", "16", "--out", str(tmp_path / f"p-{mode}"))
    kept = [json.loads((tmp_path / f"p-{m}" / "prune_report.json").read_text())["layers"] for m in ("memory", "sequential")]
    assert kept[0] == kept[1] and all("propagate" in json.loads((tmp_path / f"p-{m}" / "prune_report.json").read_text())
                                      for m in ("memory", "sequential"))
    torch.testing.assert_close(reload(tmp_path / "p-memory")(ids(batch=1, length=8)).logits,
                               reload(tmp_path / "p-sequential")(ids(batch=1, length=8)).logits, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(device, "available_bytes", lambda dev="cpu": 1000)
    run("ppl", str(path), "--data", str(text), "--max-tokens", "256", "--window", "64")


# ---------------------------------------------------------------------------------------------- error propagation
def test_propagating_prune_scores_each_layer_on_the_pruned_prefix(saved, tmp_path):
    """Layer i's experts are chosen from a profile of the model whose layers 0..i-1 are already pruned."""
    from moekit.core import arch
    from moekit.prune.prune import PruneConfig, apply_plan, plan
    from moekit.prune.sequential import prune_propagating

    path, model, tokens, stats = saved
    cfg = PruneConfig(ratio=0.5)
    report = prune_propagating(path, cfg, tmp_path / "out", stats=stats, tokens=tokens, **CPU)
    chosen = {r["layer"]: r["kept"] for r in report["layers"]}
    mem = copy.deepcopy(model)
    for layer in arch.moe_layers(mem):  # in memory: prune layer by layer, re-profiling the pruned prefix each time
        live = profile(mem, ProfileConfig(progress=False), tokens=tokens)
        live.tensors.update({k: v for k, v in stats.tensors.items() if k.startswith(("down_max", "hidden_max"))})
        expected = plan([layer], live, cfg)[layer.index]
        assert chosen[layer.index] == expected, layer.index
        apply_plan(mem, {layer.index: expected}, source_fingerprint="x")
    back = reload(tmp_path / "out")
    x = ids(batch=2, length=8)
    torch.testing.assert_close(back(x).logits, mem(x).logits, rtol=1e-5, atol=1e-5)


def test_propagating_prune_in_memory_equals_the_checkpoint_walk(saved, tmp_path):
    """``prune_`` with calibration tokens is error-propagating by default (the recipe's and the API's path): the same
    experts and the same model as the layer-sequential walk over the checkpoint; without tokens, or with
    propagate=False, it is the one-pass plan from the statistics."""
    from moekit.core import arch
    from moekit.prune.prune import PruneConfig, plan, prune_
    from moekit.prune.sequential import prune_propagating

    path, model, tokens, stats = saved
    walked = prune_propagating(path, PruneConfig(ratio=0.5), tmp_path / "out", stats=stats, tokens=tokens, **CPU)
    mem = copy.deepcopy(model)
    report = prune_(mem, PruneConfig(ratio=0.5), stats=stats, tokens=tokens)
    assert report["propagate"]
    assert [r["kept"] for r in report["layers"]] == [r["kept"] for r in walked["layers"]]
    back = reload(tmp_path / "out")
    assert back.config.moekit_kept_experts == mem.config.moekit_kept_experts
    x = ids(batch=2, length=8)
    torch.testing.assert_close(back(x).logits, mem(x).logits, rtol=1e-5, atol=1e-5)
    one_pass = plan(arch.moe_layers(model), stats, PruneConfig(ratio=0.5))
    if model.config.model_type != "olmoe":  # these tiny models keep other experts once the prefix is pruned (olmoe's agree)
        assert {r["layer"]: r["kept"] for r in report["layers"]} != one_pass
    for given in (dict(), dict(tokens=tokens)):  # no tokens; tokens with propagate=False
        cfg = PruneConfig(ratio=0.5, propagate=False if given else None)
        rep = prune_(copy.deepcopy(model), cfg, stats=stats, **given)
        assert "propagate" not in rep and {r["layer"]: r["kept"] for r in rep["layers"]} == one_pass


def test_propagating_route_fits_each_layer_on_the_rerouted_prefix(saved, tmp_path):
    from moekit.route.route import RouteConfig
    from moekit.route.sequential import route_sequential

    path, _, tokens, stats = saved
    cfg = dict(top_k=1, mitigations=("rescale",))
    plain = route_sequential(path, RouteConfig(**cfg), tmp_path / "a", stats=stats, tokens=tokens, **CPU)
    prop = route_sequential(path, RouteConfig(**cfg), tmp_path / "b", stats=stats, tokens=tokens, propagate=True, **CPU)
    first, *rest = sorted(plain["scales"])
    assert prop["scales"][first] == plain["scales"][first]  # the first MoE layer sees the same tokens either way
    if rest:  # later layers see what the re-routed layers before them compute
        assert prop["scales"][rest[-1]] != plain["scales"][rest[-1]]
    reload(tmp_path / "b")


def test_propagating_merge_fits_each_layer_on_the_merged_prefix(saved, tmp_path):
    """Layer i's router rows and coefficients are fitted on what the already merged layers 0..i-1 compute: the same
    model as merging in memory layer by layer, each layer on inputs captured from the model merged so far."""
    from moekit.core import arch
    from moekit.merge.fit import capture_inputs, split_holdout
    from moekit.merge.merge import MergeConfig, _merge_layer, plan_groups
    from moekit.merge.sequential import merge_sequential

    path, model, tokens, stats = saved
    n = max(layer.num_experts for layer in arch.moe_layers(model))
    cfg = MergeConfig(target=n // 2, router="fitted")  # fitted rows depend on the inputs the layer is fitted on
    plain = merge_sequential(path, cfg, tmp_path / "plain", stats=stats, tokens=tokens, **CPU)
    prop = merge_sequential(path, cfg, tmp_path / "prop", stats=stats, tokens=tokens, propagate=True, **CPU)
    assert prop["propagate"] and not plain["propagate"]
    mem = copy.deepcopy(model)
    layers = arch.moe_layers(mem)
    plan, split = plan_groups(layers, stats, cfg), split_holdout(len(tokens), cfg.holdout, cfg.seed)
    for layer in layers:
        with torch.no_grad():
            inputs = capture_inputs(mem, [layer], tokens, cfg.batch_size)
        _merge_layer(layer, plan[layer.index], stats, cfg, inputs, split)
    back = reload(tmp_path / "prop")
    x = ids(batch=2, length=8)
    torch.testing.assert_close(back(x).logits, mem(x).logits, rtol=1e-4, atol=1e-4)
    if len(layers) > 1:  # the first MoE layer sees the same tokens either way; a later one does not
        last = layers[-1].index
        rows = {name: arch.moe_layers(reload(tmp_path / name))[-1].router_weight for name in ("plain", "prop")}
        assert not torch.equal(rows["plain"], rows["prop"]), last


def test_propagating_densify_scores_each_layer_on_the_densified_prefix(saved, tmp_path):
    """Layer i's experts are chosen from a profile of the model whose layers 0..i-1 already run their dense FFNs:
    the same dense model as densifying in memory layer by layer, re-profiling the partly dense model each time."""
    from transformers import AutoModelForCausalLM

    from moekit.core import arch
    from moekit.core.arch import MOE_FAMILIES as FAMILIES
    from moekit.core.keys import DENSIFIED_KEY
    from moekit.densify.densify import DensifyConfig, _dense_ffn, _mean_gates
    from moekit.densify.sequential import densify_sequential

    path, model, tokens, stats = saved
    if FAMILIES[model.config.model_type].dense_model_type is None:
        pytest.skip(f"{model.config.model_type} has no dense twin")
    cfg = DensifyConfig(keep=2, shared_gate="mean")
    densify_sequential(path, cfg, tmp_path / "out", stats=stats, tokens=tokens, propagate=True, **CPU)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    mem, chosen = copy.deepcopy(model), {}
    gram = ProfileConfig(progress=False, gram_tokens=stats.meta["gram_tokens"])
    for layer in arch.moe_layers(mem):  # each layer scored on what the dense layers before it compute
        live = profile(mem, gram, tokens=tokens)
        with torch.no_grad():
            c = _mean_gates(mem, [layer], tokens)[layer.index] if layer.shared_gate is not None else 1.0
        (g, u, d), info = _dense_ffn(layer, live, cfg, c)
        chosen[str(layer.index)] = info["selected"]
        mlp = copy.deepcopy(back.model.layers[layer.index].mlp)  # the dense model's MLP, padded as it pads
        with torch.no_grad():
            n = g.shape[0]
            for name, w in (("gate_proj", g), ("up_proj", u)):
                getattr(mlp, name).weight.zero_()[:n] = w
            mlp.down_proj.weight.zero_()[:, :n] = d
        setattr(arch.decoder_layers(mem)[layer.index], layer.family.block_attr, mlp)
    record = getattr(back.config, DENSIFIED_KEY)["layers"]
    assert {k: v["selected"] for k, v in record.items()} == chosen
    one_pass = {str(la.index): _dense_ffn(la, stats, cfg, 1.0)[1]["selected"] for la in arch.moe_layers(model)}
    assert one_pass != chosen  # these tiny models pick other experts in their last layer once the prefix is dense
    x = ids(batch=2, length=8)
    torch.testing.assert_close(back(x).logits, mem(x).logits, rtol=1e-4, atol=1e-4)
