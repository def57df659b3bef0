"""Bad input: one line on stderr, exit 2, no traceback, nothing written.

``CASES`` is the table of bad inputs across every command (each class of the issue: unreadable model inputs,
undecodable data, impossible numbers, devices, the file system, tampered statistics, wrong recipe types);
``test_bad_input_table`` runs each through the real CLI in process. A case passes when the command exits 2 with
exactly one ``moekit: error:`` line that contains the expected words, and leaves no output behind."""

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
    (["--max-tokens", "0"], "--max-tokens 0 must be at least 1"),
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
    assert code == 2 and one_error(err) and "plot.png' already exists" in err
    assert (tmp_path / "plot.png").read_bytes() == b"mine"



# ---------------------------------------------------------------------------------------------- the table
@pytest.fixture(scope="module")
def bad(saved, tmp_path_factory):
    """Every broken input the table needs, made once."""
    import os
    import shutil

    from safetensors.torch import save_file
    import torch

    root = tmp_path_factory.mktemp("broken")
    model = saved / "model"
    weights = next(model.glob("*.safetensors"))

    def copy_model(name):
        shutil.copytree(model, root / name)
        return root / name

    (copy_model("malformed-config") / "config.json").write_text('{"model_type": "qwen3_moe", ')
    (copy_model("list-config") / "config.json").write_text("[1, 2]")
    truncated = copy_model("truncated")
    data = (truncated / weights.name).read_bytes()
    (truncated / weights.name).write_bytes(data[: len(data) // 2])
    (copy_model("corrupt-header") / weights.name).write_bytes(b"\xff" * 64)
    cfg = json.loads((model / "config.json").read_text())
    (copy_model("auto-map") / "config.json").write_text(json.dumps({**cfg, "model_type": "my_moe",
                                                                    "auto_map": {"AutoModelForCausalLM": "modeling.MyMoE"}}))
    (copy_model("unknown-type") / "config.json").write_text(json.dumps({**cfg, "model_type": "not_a_model"}))
    (copy_model("shape-mismatch") / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
    pickle_only = root / "pickle-only"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text(json.dumps(cfg))
    (pickle_only / "pytorch_model.bin").write_bytes(b"not loaded")
    # a sharded checkpoint with one shard gone; one whose index names a file that is not there; FP8 without scales
    from safetensors.torch import load_file

    tensors = load_file(weights)
    keys = sorted(tensors)
    for name, lost in (("missing-shard", "model-00002-of-00002.safetensors"), ("index-absent", "model-00007-of-00002.safetensors")):
        folder = copy_model(name)
        (folder / weights.name).unlink()
        halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
        for shard, names in halves.items():
            save_file({k: tensors[k] for k in names}, str(folder / shard), metadata={"format": "pt"})
        wmap = {k: shard for shard, names in halves.items() for k in names}
        if name == "missing-shard":
            (folder / lost).unlink()
        else:
            wmap[keys[-1]] = lost
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    fp8 = copy_model("fp8-no-scales")
    quantized = {k: (v.to(torch.float8_e4m3fn) if k.endswith("q_proj.weight") else v) for k, v in tensors.items()}
    save_file(quantized, str(fp8 / weights.name), metadata={"format": "pt"})
    (fp8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}))
    (root / "junk.gguf").write_bytes(b"this is not gguf" * 8)
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    (root / "binary.jsonl").write_bytes(b'{"text": "ok"}\n' + b"\xff\xfe\x81\n")
    (root / "notjson.jsonl").write_text("this is not json\n")
    (root / "nofield.jsonl").write_text('{"body": "text here"}\n' * 4)
    (root / "empty.txt").write_text("")
    (root / "junk.bin").write_bytes(os.urandom(256))
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "existing.safetensors").write_bytes(b"mine")
    readonly = root / "readonly"
    readonly.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes into a 0555 folder: a read-only file system is what stops root
        import subprocess

        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
                                 capture_output=True).returncode == 0
    else:
        readonly.chmod(0o555)
    if not os.access(readonly, os.W_OK):
        (root / "readonly-works").touch()
    from moekit.profile.stats import ExpertStats

    stats = ExpertStats.load(saved / "stats.safetensors")
    key = next(k for k in stats.tensors if k.startswith("reap_sum."))
    stats.tensors[key] = torch.ones(stats.tensors[key].numel() + 3)
    stats.save(root / "tampered.safetensors")
    save_file({"x": torch.zeros(2)}, str(root / "foreign.safetensors"))
    (root / "recipe-types.yaml").write_text(f"model: {model}\nsteps:\n  - profile: {{data: {saved / 'text.txt'}, n_seq: many}}\n")
    (root / "recipe-ratio.yaml").write_text(f"model: {model}\nsteps:\n  - profile: {{data: {saved / 'text.txt'}}}\n"
                                            "  - prune: {ratio: a quarter}\n")
    (root / "recipe-yaml.yaml").write_text("model: [unclosed\n")
    (root / "recipe-python.yaml").write_text("model: !!python/object/apply:os.system ['echo hi']\nsteps:\n  - profile: {}\n")
    result = {"schema": "moekit.eval/1", "model": {"name": "m", "params": {"total": 10, "active": 5}},
              "tasks": {"arc_easy": {"summary": 0.5, "summary_metric": "acc_norm", "acc": 0.5, "acc_norm": 0.5, "n": 10}}}
    (root / "result.json").write_text(json.dumps(result))
    yield root
    if mounted:
        subprocess.run(["umount", str(readonly)], capture_output=True)
    readonly.chmod(0o755)


M, S, T = "{model}", "{stats}", "{text}"
CASES = [  # (command line with {placeholders}, words the one error line must contain)
    # unreadable model inputs
    ("info {bad}/nowhere", "does not exist"),
    ("info {bad}/malformed-config", "not valid JSON"),
    ("info {bad}/list-config", "not a JSON object"),
    ("info {bad}/truncated", "cannot read"),
    ("info {bad}/corrupt-header", "cannot read"),
    ("info {bad}/auto-map", "--trust-remote-code"),
    ("info {bad}/unknown-type", "not_a_model"),
    ("info {bad}/shape-mismatch", "shape"),
    ("info {bad}/pickle-only", "pickle"),
    ("info {bad}/junk.gguf", "not a GGUF file"),
    ("info {bad}/dangling", "dangling"),
    ("info {text}", "is a file"),
    ("convert {bad}/junk.gguf --out {tmp}/o", "not a GGUF file"),
    ("prune {bad}/truncated --stats {stats} --ratio 0.25 --shardwise --out {tmp}/o", "cut short"),
    ("prune {bad}/missing-shard --stats {stats} --ratio 0.25 --mode sequential --out {tmp}/o", "00002-of-00002"),
    ("ppl {bad}/missing-shard --data {text} --window 64", "00002-of-00002"),
    ("profile {bad}/index-absent --data {text} --mode sequential --out {tmp}/o.safetensors", "00007-of-00002"),
    ("ppl {bad}/fp8-no-scales --data {text} --window 64 --mode sequential", "weight_scale_inv"),
    ("ppl {model} --data {text} --mode everywhere", "unknown --mode"),
    ("prune {model} --stats {stats} --ratio 0.25 --propagate --out {tmp}/o", "give tokens (--data)"),
    ("prune {model} --stats {stats} --keep 2 --budget global --propagate --data {text} --out {tmp}/o",
     "a global budget needs every layer's scores"),
    ("prune {model} --stats {stats} --ratio 0.25 --shardwise --data {text} --out {tmp}/o", "add --no-propagate"),
    ("prune {model} --stats {stats} --ratio 0.25 --propagate --data {text} --n-seq 0 --out {tmp}/o", "--n-seq 0"),
    ("prune {model} --stats {stats} --ratio 0.25 --propagate --data {text} --seq-len 1 --out {tmp}/o", "--seq-len 1"),
    ("prune {model} --stats {stats} --ratio 0.25 --propagate --data {bad}/binary.txt --out {tmp}/o", "not UTF-8"),
    ("merge {model} --stats {stats} --target 2 --propagate --out {tmp}/o", "--propagate fits each layer"),
    ("merge {model} --stats {stats} --target 2 --propagate --data {text} --mode memory --out {tmp}/o",
     "drop --mode memory"),
    ("route {model} --stats {stats} --top-k 1 --propagate --data {text} --out {tmp}/o", "add --mitigation rescale"),
    ("route {model} --stats {stats} --top-k 1 -m rescale --propagate --out {tmp}/o", "give --data"),
    ("densify {model} --stats {stats} --keep 1 --propagate --out {tmp}/o", "densify --propagate fits each layer"),
    ("distill {bad}/auto-map --teacher {model} --data {text} --out {tmp}/o", "--trust-remote-code"),
    ("heal {model} --teacher {bad}/nowhere --data {text} --out {tmp}/o", "--teacher"),
    ("eval {model} --baseline {bad}/malformed-config --costs --out {tmp}/o.json", "not valid JSON"),
    # undecodable or unusable data
    ("ppl {model} --data {bad}/binary.txt --window 64", "not UTF-8"),
    ("ppl {model} --data {bad}/binary.jsonl --window 64", "not UTF-8"),
    ("ppl {model} --data {bad}/notjson.jsonl --window 64", "not valid JSON"),
    ("ppl {model} --data {bad}/nofield.jsonl --window 64", "text"),
    ("ppl {model} --data {bad}/empty.txt", "is empty"),
    ("ppl {model} --data {bad}", "is a directory"),
    ("ppl {model} --data {bad}/nowhere.txt", "does not exist"),
    ("profile {model} --data {bad}/binary.txt --out {tmp}/o.safetensors", "not UTF-8"),
    ("carve {model} --data {bad}/nowhere.jsonl --out {tmp}/o", "does not exist"),
    ("eval {model} --ppl-data {bad}/binary.txt --out {tmp}/o.json --tasks arc_easy", "not UTF-8"),
    # impossible numbers
    ("ppl {model} --data {text} --window 0", "--window 0 must be at least 2"),
    ("ppl {model} --data {text} --batch-size 0", "--batch-size 0 must be at least 1"),
    ("ppl {model} --data {text} --max-tokens -5", "--max-tokens -5"),
    ("ppl {model} --data {text} --backend tpu", "unknown backend"),
    ("profile {model} --data {text} --seq-len -5 --out {tmp}/o.safetensors", "--seq-len -5"),
    ("profile {model} --data {text} --n-seq 0 --out {tmp}/o.safetensors", "--n-seq 0"),
    ("profile {model} --data {text} --batch-size 0 --out {tmp}/o.safetensors", "--batch-size 0"),
    ("profile {model} --data {text} --gram -1 --out {tmp}/o.safetensors", "--gram -1"),
    ("prune {model} --stats {stats} --ratio 1.5 --out {tmp}/o", "--ratio 1.5"),
    ("prune {model} --stats {stats} --ratio 0 --out {tmp}/o", "--ratio 0"),
    ("prune {model} --stats {stats} --ratio nan --out {tmp}/o", "not a finite number"),
    ("prune {model} --stats {stats} --keep 0 --out {tmp}/o", "--keep 0"),
    ("prune {model} --stats {stats} --tau -1 --ratio 0.25 --out {tmp}/o", "--tau -1"),
    ("uniform {model} --stats {stats} --keep 0 --out {tmp}/o", "--keep 0"),
    ("merge {model} --stats {stats} --target 0 --out {tmp}/o", "--target 0"),
    ("merge {model} --stats {stats} --target 4 --lr -1 --out {tmp}/o", "--lr -1"),
    ("merge {model} --stats {stats} --target 4 --rank 0 --out {tmp}/o", "--rank 0"),
    ("route {model} --stats {stats} --top-k 0 --out {tmp}/o", "--top-k 0"),
    ("route {model} --stats {stats} --top-k -2 --out {tmp}/o", "--top-k -2"),
    ("route {model} --stats {stats} --threshold 1.5 --out {tmp}/o", "--threshold 1.5"),
    ("carve {model} --data {text} --experts 0 --out {tmp}/o", "--experts 0"),
    ("carve {model} --data {text} --shared -1 --out {tmp}/o", "--shared -1"),
    ("carve {model} --data {text} --active 0 --out {tmp}/o", "--active 0"),
    ("heal {model} --teacher {model} --data {text} --n-seq 0 --out {tmp}/o", "--n-seq 0"),
    ("densify {model} --stats {stats} --keep 0 --out {tmp}/o", "--keep 0"),
    ("distill {model} --teacher {model} --data {text} --steps 0 --out {tmp}/o", "--steps 0"),
    ("distill {model} --teacher {model} --data {text} --lr 0 --out {tmp}/o", "--lr 0"),
    ("distill {model} --teacher {model} --data {text} --seq-len 1 --out {tmp}/o", "--seq-len 1"),
    ("eval {model} --limit 0 --out {tmp}/o.json", "--limit 0"),
    ("eval {model} --limit -5 --out {tmp}/o.json", "--limit -5"),
    ("eval {model} --num-fewshot -1 --out {tmp}/o.json", "--num-fewshot -1"),
    ("eval {model} --ppl-window 1 --out {tmp}/o.json", "--ppl-window 1"),
    ("ablate {model} --data {text} --window 1", "--window 1"),
    ("ablate {model} --data {text} --random 0", "--random 0"),
    ("ablate {model} --data {text} --seed -1", "--seed -1"),
    ("carve {model} --data {text} --k-a 0 --out {tmp}/o", "--k-a 0"),
    ("carve {model} --data {text} --iterations 0 --out {tmp}/o", "--iterations 0"),
    ("carve {model} --data {text} --seed -1 --out {tmp}/o", "--seed -1"),
    ("carve {model} --data {text} --local-epochs -1 --out {tmp}/o", "--local-epochs -1"),
    ("heal {model} --teacher {model} --data {text} --seed -1 --out {tmp}/o", "--seed -1"),
    ("heal {model} --teacher {model} --data {text} --local-epochs -1 --out {tmp}/o", "--local-epochs -1"),
    ("heal {model} --teacher {model} --data {text} --distill-steps -1 --out {tmp}/o", "--distill-steps -1"),
    ("heal {model} --teacher {model} --data {text} --finetune-steps -1 --out {tmp}/o", "--finetune-steps -1"),
    ("densify {model} --stats {stats} --seed -1 --out {tmp}/o", "--seed -1"),
    ("distill {model} --teacher {model} --data {text} --warmup -1 --out {tmp}/o", "--warmup -1"),
    ("distill {model} --teacher {model} --data {text} --checkpoint-every -1 --out {tmp}/o", "--checkpoint-every -1"),
    ("distill {model} --teacher {model} --data {text} --seed -1 --out {tmp}/o", "--seed -1"),
    ("distill-router {model} --teacher {bad}/nowhere --data {text} --out {tmp}/o", "--teacher"),
    ("distill-router {model} --teacher {model} --data {bad}/nowhere.txt --out {tmp}/o", "does not exist"),
    ("distill-router {model} --teacher {model} --data {text} --out {bad}", "already exists"),
    ("distill-router {model} --teacher {model} --data {text} --steps 0 --out {tmp}/o", "--steps 0"),
    ("distill-router {model} --teacher {model} --data {text} --tokens 0 --out {tmp}/o", "--tokens 0"),
    ("distill-router {model} --teacher {model} --data {text} --tokens 100 --out {tmp}/o", "less than one step"),
    ("distill-router {model} --teacher {model} --data {text} --lr 0 --out {tmp}/o", "--lr 0"),
    ("distill-router {model} --teacher {model} --data {text} --batch-size 0 --out {tmp}/o", "--batch-size 0"),
    ("distill-router {model} --teacher {model} --data {text} --seq-len 1 --out {tmp}/o", "--seq-len 1"),
    ("distill-router {model} --teacher {model} --data {text} --warmup -1 --out {tmp}/o", "--warmup -1"),
    ("distill-router {model} --teacher {model} --data {text} --heldout -1 --out {tmp}/o", "--heldout -1"),
    ("distill-router {model} --teacher {model} --data {text} --checkpoint-every -1 --out {tmp}/o", "--checkpoint-every -1"),
    ("distill-router {model} --teacher {model} --data {text} --seed -1 --out {tmp}/o", "--seed -1"),
    ("eval {model} --ppl-tokens 0 --out {tmp}/o.json", "--ppl-tokens 0"),
    ("eval {model} --backend vllm --vllm-python {bad}/nowhere --out {tmp}/o.json", "--vllm-python"),
    ("ppl {model} --data {text} --backend vllm --vllm-python {bad}/nowhere", "--vllm-python"),
    ("merge {model} --stats {stats} --target-total 0 --out {tmp}/o", "--target-total 0"),
    ("merge {model} --stats {stats} --target 4 --merges-per-layer -1 --out {tmp}/o", "--merges-per-layer -1"),
    ("merge {model} --stats {stats} --target 4 --max-cluster 0 --out {tmp}/o", "--max-cluster 0"),
    ("profile {model} --data {text} --plots {bad}/readonly/p --out {tmp}/o.safetensors", "not writable"),
    ("profile {model} --data {text} --seed -1 --out {tmp}/o.safetensors", "--seed -1"),
    ("prune {model} --stats {stats} --top-k-prime 0 --ratio 0.25 --out {tmp}/o", "--top-k-prime 0"),
    ("prune {model} --stats {stats} --seed -1 --ratio 0.25 --out {tmp}/o", "--seed -1"),
    ("serve-check {model} --max-model-len 1", "--max-model-len 1"),
    ("serve-check {model} --vllm-python {bad}/nowhere", "--vllm-python"),
    ("quantize {model} --out {tmp}/o --llmc-python {bad}/nowhere", "--llmc-python"),
    ("serve-check {model} --atol 0", "--atol 0"),
    ("serve-check {model} --prompts 0", "--prompts 0"),
    ("serve-check {model} --gpu-memory-utilization 1.5", "--gpu-memory-utilization 1.5"),
    ("serve-check {model} --timeout 0", "--timeout 0"),
    ("quantize {model} --scheme INT3 --out {tmp}/o", "INT3"),
    ("ppl {model} --data {text} --window abc", "Invalid value for '--window'"),
    ("prune {model} --stats {stats} --ratio a-quarter --out {tmp}/o", "Invalid value for '--ratio'"),
    ("info {model} --bogus 1", "No such option: --bogus"),
    ("prune {model} --ratio 0.25 --out {tmp}/o", "needs expert statistics: pass --stats"),
    ("nosuch {model}", "No such command"),
    # devices and dtypes
    ("info {model} --device cuda:99", "cuda"),
    ("ppl {model} --data {text} --device cuda", "cuda"),
    ("info {model} --device tpu", "unknown device"),
    ("info --families --vllm-python {bad}/nowhere", "--vllm-python"),
    ("info {model} --dtype int3", "unknown dtype"),
    ("info {model} --device-map cuda:3", "does not exist"),
    ("ppl {model} --data {text} --device-map '{{\"model.embed_tokens\": 5, \"\": \"cpu\"}}'", "device 5 does not exist"),
    ("info {model} --device-map tpu", "unknown device"),
    ("info {model} --device-map '{{\"model.layers.0\": \"cpu\"'", "not valid JSON"),
    ("info {model} --device-map {bad}/nowhere.json", "does not exist"),
    ("info {model} --device-map '{{\"model.nothing\": \"cpu\", \"\": \"cpu\"}}'", "'model.nothing'"),
    ("profile {model} --data {text} --device-map '{{\"model\": \"cpu\"}}' --out {tmp}/o.safetensors", "no device to 'lm_head"),
    ("prune {model} --stats {stats} --ratio 0.25 --device-map '{{\"\": \"disk\"}}' --out {tmp}/o", "--offload-folder"),
    ("info {model} --device cpu --device-map auto", "pass one of them"),
    ("convert {model} --max-memory cpu=lots --out {tmp}/o", "not a size"),
    ("merge {model} --stats {stats} --target 4 --max-memory 0=1GiB --out {tmp}/o", "does not exist"),
    ("carve {model} --data {text} --max-memory cpu=1KiB --out {tmp}/o", "one decoder layer needs"),
    ("route {model} --stats {stats} --device-map '{{\"\": \"cpu\"}}' --max-memory cpu=1GiB --out {tmp}/o", "--max-memory"),
    ("uniform {model} --stats {stats} --offload-folder {text} --out {tmp}/o", "is a file"),
    ("eval {model} --offload-folder {bad}/readonly/off --out {tmp}/o.json", "not writable"),
    # the file system
    ("profile {model} --data {text} --out {bad}/readonly/s.safetensors", "not writable"),
    ("profile {model} --data {text} --out {bad}/dangling", "dangling"),
    ("profile {model} --data {text} --out {bad}/existing.safetensors", "already exists"),
    ("prune {model} --stats {stats} --ratio 0.25 --out .", "current directory"),
    ("prune {model} --stats {stats} --ratio 0.25 --out {model}", "would replace the input"),
    ("convert {model} --out {bad}/readonly/o", "not writable"),
    ("convert {model} --out {bad}/dangling", "dangling"),
    ("convert {model} --out {text}/o", "is a file"),
    ("compare {bad}/result.json --plot {bad}/readonly/x.png", "not writable"),
    ("compare {bad}/result.json --plot .", "current directory"),
    ("eval {model} --out {bad} --tasks arc_easy", "already exists"),
    ("serve-check {model} --json {bad}/existing.safetensors", "already exists"),
    ("ablate {model} --data {text} --json {bad}/dangling", "dangling"),
    ("eval {model} --data-dir {bad}/nowhere --out {tmp}/o.json", "not a directory"),
    # statistics and result files
    ("prune {model} --stats {bad}/nowhere.safetensors --ratio 0.25 --out {tmp}/o", "does not exist"),
    ("prune {model} --stats {bad}/tampered.safetensors --ratio 0.25 --out {tmp}/o", "shape"),
    ("prune {model} --stats {bad}/junk.bin --ratio 0.25 --out {tmp}/o", "statistics"),
    ("prune {model} --stats {bad}/foreign.safetensors --ratio 0.25 --out {tmp}/o", "statistics"),
    ("densify {model} --stats {bad} --out {tmp}/o", "is a directory"),
    ("compare {bad}/junk.bin", "result"),
    ("compare {bad}/binary.txt", "result"),
    ("compare {bad}/nowhere.json", "does not exist"),
    ("compare {bad}/result.json --params bogus --plot {tmp}/p.png", "bogus"),
    # recipes
    ("run {bad}/recipe-types.yaml --out {tmp}/o", "n_seq"),
    ("run {bad}/recipe-ratio.yaml --out {tmp}/o", "ratio"),
    ("run {bad}/recipe-yaml.yaml --out {tmp}/o", "YAML"),
    ("run {bad}/recipe-python.yaml --out {tmp}/o", "YAML"),
    ("run {bad}/nowhere.yaml --out {tmp}/o", "does not exist"),
]


@pytest.mark.parametrize("line, words", CASES, ids=[c[0].split()[0] + ":" + c[1] for c in CASES])
def test_bad_input_table(line, words, saved, bad, tmp_path, cli, monkeypatch):
    import shlex

    if "readonly" in line and not (bad / "readonly-works").exists():
        pytest.skip("no read-only folder can be made here (root without mount)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    values = {"model": saved / "model", "stats": saved / "stats.safetensors", "text": saved / "text.txt", "bad": bad,
              "tmp": tmp_path}
    argv = [a.format(**values) for a in shlex.split(line)]
    code, _, err = cli(*argv)
    assert code == 2 and one_error(err) and words in err, (line, code, err[-500:])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.json").exists()


def test_the_table_covers_every_command_and_every_number_and_path_option():
    """At least 60 cases; every command appears, and so does every option that takes a number or a path."""
    import inspect
    from pathlib import Path

    from moekit.cli import app

    assert len(CASES) >= 60
    lines = [c[0] for c in CASES]
    used = {line.split()[0] for line in lines}
    flags = {tok for line in lines for tok in line.split() if tok.startswith("--")}
    missing = []
    for c in app.registered_commands:
        name = c.name or c.callback.__name__
        if name in ("vllm-env", "llmc-env", "demo"):  # they install environments / run the fixed demo
            continue
        if name not in used:
            missing.append(name)
        for param in inspect.signature(c.callback).parameters.values():
            info = param.default
            numeric_or_path = param.annotation in ("int", "float", "Path") or param.annotation in (int, float, Path)
            opts = [o for o in getattr(info, "param_decls", ()) or () if o.startswith("--")]
            if numeric_or_path and opts and not any(o.split("/")[0] in flags for o in opts):
                missing.append(f"{name} {opts[0]}")
    assert not missing, f"no bad-input case for: {missing}"


def test_too_little_free_space_is_refused_before_any_work(saved, tmp_path, cli, monkeypatch):
    import shutil
    from collections import namedtuple

    from moekit.cli import checks

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    code, _, err = cli("convert", saved / "model", "--out", tmp_path / "o")
    assert code == 2 and one_error(err) and "needs about" in err and "GiB free" in err, err
    assert not (tmp_path / "o").exists()
    assert shutil.disk_usage is not None


def test_a_disk_that_fills_during_the_write_is_one_line_and_leaves_nothing(saved, tmp_path, cli):
    """A real full disk: a small tmpfs that holds the weights' size (the pre-check passes) but not the whole save."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    weights = sum(f.stat().st_size for f in (saved / "model").glob("*.safetensors"))
    size_k = (weights + 8191) // 4096 * 4 + 4  # just above the weights
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        code, _, err = cli("convert", saved / "model", "--out", disk / "o")
        assert code == 2 and one_error(err) and "disk is full" in err, err
        assert os.listdir(disk) == []  # no half-written output, no temporary folder left behind
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
