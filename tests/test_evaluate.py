"""Evaluation through lm-evaluation-harness in process: scores, the shared-context path, results, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moekit.errors import MoekitError
from tiny import MOE_FAMILIES, tiny_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev"
CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\n-"


def letters_tokenizer():
    """A character-level fast tokenizer (one token per character), built offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny(family: str = "llama", seed: int = 0):
    return tiny_model(family, seed=seed, vocab_size=len(CHARS) + 4, max_position_embeddings=512)


def arc_records(n: int = 8, correct_z: tuple[int, ...] = (0, 3, 5)) -> list[dict]:
    """ARC-format items; the choice 'z' is the answer in items ``correct_z`` and a wrong choice elsewhere."""
    out = []
    for i in range(n):
        texts = ["z", "ab", "c d", "efg"]
        texts = texts[i % 4:] + texts[: i % 4]  # 'z' moves around
        zpos = texts.index("z")
        answer = zpos if i in correct_z else (zpos + 1) % 4
        out.append({"id": f"t-{i}", "question": f"What is item {i}?" + " more" * (i % 3),
                    "choices": {"text": texts, "label": list("ABCD")}, "answerKey": "ABCD"[answer]})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def arc_dir(tmp_path):
    write_jsonl(tmp_path / "arc_easy.jsonl", arc_records())
    return tmp_path


def prefer_token(model, token_id: int, boost: float = 50.0):
    """Make ``model`` always put (nearly) all probability on ``token_id``."""
    def hook(_module, _inputs, output):
        output[..., token_id] += boost
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


def test_model_preferring_one_answer_scores_its_share(arc_dir):
    from moekit.eval.harness import evaluate

    tok = letters_tokenizer()
    model = tiny()
    prefer_token(model, tok.convert_tokens_to_ids("z"))
    r = evaluate(model, tok, tasks=["arc_easy"], data_dir=arc_dir, batch_size=4)
    t = r["tasks"]["arc_easy"]
    assert t["n"] == 8
    assert t["acc"] == pytest.approx(3 / 8, abs=0)
    assert t["acc_norm"] == pytest.approx(3 / 8, abs=0)
    assert t["summary"] == t["acc_norm"] and t["summary_metric"] == "acc_norm"
    r2 = evaluate(model, tok, tasks=["arc_easy"], data_dir=arc_dir, limit=4, batch_size=4)
    assert r2["tasks"]["arc_easy"]["n"] == 4
    assert r2["tasks"]["arc_easy"]["acc"] == pytest.approx(2 / 4, abs=0)  # items 0 and 3 of the first four


def _requests(lm, records):
    reqs = []
    for r in records:
        ctx = f"Question: {r['question']}\nAnswer:"
        for c in r["choices"]["text"]:
            ce, ke = lm._encode_pair(ctx, " " + c)
            reqs.append(((ctx, " " + c), ce, ke))
    return reqs


@pytest.mark.parametrize("family", ["llama", *MOE_FAMILIES])
def test_shared_context_path_equals_harness_path(family):
    from moekit.eval.harness_lm import ReuseContextLM

    tok = letters_tokenizer()
    model = tiny(family, seed=1)
    lm = ReuseContextLM(model, tok, batch_size=4)  # two context batches, continuation chunks of 4 rows
    reqs = _requests(lm, arc_records(6))
    ours = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    lm.reuse_context = False
    theirs = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(ours) == len(theirs) == 24
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4, rel=1e-5)
        assert ga == gb


def test_shared_context_results_equal_plain_results(arc_dir):
    from moekit.eval.harness import evaluate

    tok = letters_tokenizer()
    model = tiny("qwen3_moe", seed=2)
    a = evaluate(model, tok, tasks=["arc_easy"], data_dir=arc_dir, batch_size=8)
    b = evaluate(model, tok, tasks=["arc_easy"], data_dir=arc_dir, batch_size=8, reuse_context=False)
    for m in ("acc", "acc_norm"):
        assert a["tasks"]["arc_easy"][m] == b["tasks"]["arc_easy"][m]
    assert a["settings"]["reuse_context"] and not b["settings"]["reuse_context"]


def test_result_schema_and_files(arc_dir, tmp_path):
    from moekit.eval.harness import SCHEMA, evaluate, write_result
    from moekit.profile.stats import fingerprint

    tok = letters_tokenizer()
    model = tiny()
    r = evaluate(model, tok, tasks="arc_easy", data_dir=arc_dir, limit=5, model_name="tiny-llama")
    assert r["schema"] == SCHEMA
    assert set(r) >= {"moekit_version", "harness_version", "created", "model", "tasks", "data", "settings", "costs",
                      "perplexity", "seconds"}
    assert r["model"]["fingerprint"] == fingerprint(model)
    assert r["model"]["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert r["settings"]["limit"] == 5 and r["settings"]["num_fewshot"] == 0
    d = r["data"]["arc_easy"]
    assert d["source"] == "local" and d["records"] == 8 and len(d["sha256"]) == 64
    assert Path(d["path"]) == (arc_dir / "arc_easy.jsonl").resolve()
    out, md = write_result(r, tmp_path / "res" / "r.json")
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    table = md.read_text()
    assert "arc_easy (acc_norm)" in table and "tiny-llama" in table and "(n=5)" in table
    assert not list((tmp_path / "res").glob(".*tmp"))


def test_task_to_file_mapping(tmp_path):
    from moekit.eval.harness import evaluate

    f = write_jsonl(tmp_path / "my_arc.jsonl", arc_records(4, correct_z=(1,)))
    tok = letters_tokenizer()
    model = tiny()
    prefer_token(model, tok.convert_tokens_to_ids("z"))
    r = evaluate(model, tok, tasks=["arc_easy"], data_files={"arc_easy": f})
    assert r["tasks"]["arc_easy"]["acc"] == 0.25
    assert r["data"]["arc_easy"]["path"] == str(f.resolve())


def test_unknown_task_lists_known_ones(arc_dir):
    from moekit.eval.harness import check_tasks

    with pytest.raises(MoekitError, match="unknown task 'arc_eazy'.*arc_easy, arc_challenge"):
        check_tasks(["arc_eazy"], data_dir=arc_dir)


def test_missing_local_file(tmp_path):
    from moekit.eval.harness import evaluate

    with pytest.raises(MoekitError, match=r"openbookqa.*openbookqa\.jsonl' does not exist"):
        evaluate(tiny(), letters_tokenizer(), tasks=["openbookqa"], data_dir=tmp_path)


def test_malformed_record_names_file_and_line(tmp_path):
    from moekit.eval.harness import evaluate

    recs = [json.dumps(r) for r in arc_records(3)]
    (tmp_path / "arc_easy.jsonl").write_text(recs[0] + "\n" + recs[1] + "\n{not json\n" + recs[2] + "\n")
    with pytest.raises(MoekitError, match=r"arc_easy\.jsonl: line 3: not valid JSON"):
        evaluate(tiny(), letters_tokenizer(), tasks=["arc_easy"], data_dir=tmp_path)
    bad = arc_records(2)
    del bad[1]["answerKey"]
    write_jsonl(tmp_path / "arc_easy.jsonl", bad)
    with pytest.raises(MoekitError, match=r"arc_easy\.jsonl: line 2: record lacks field\(s\) answerKey"):
        evaluate(tiny(), letters_tokenizer(), tasks=["arc_easy"], data_dir=tmp_path)


def test_model_without_tokenizer(arc_dir):
    from moekit.eval.harness import evaluate

    with pytest.raises(MoekitError, match="no tokenizer"):
        evaluate(tiny(), None, tasks=["arc_easy"], data_dir=arc_dir)


def test_shipped_configs_reference_harness_tasks():
    """Every offline config names harness tasks that exist, and changes only data and splits."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from moekit.eval.harness import _task_index
    from moekit.eval.tasks import TASKS, TASKS_DIR

    index = _task_index().task_index
    allowed = {"task", "group", "custom_dataset", "dataset_kwargs", "training_split", "validation_split",
               "test_split", "fewshot_split"}
    for spec in TASKS.values():
        cfg = load_yaml(TASKS_DIR / f"{spec.local_name}.yaml", resolve_func=False)
        assert cfg["group"] in index
        for member in cfg["task"]:
            name = member.get("task") or member.get("group")
            assert name in index, name
            assert set(member) <= allowed
            assert member["dataset_kwargs"]["task"] == spec.name


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data/dev is absent (offline dev data)")
def test_dev_files_match_harness_fields():
    """The dev copies load through the harness's own prompt, choices and target for each dev task."""
    from moekit.eval.harness import task_manager
    from moekit.eval.tasks import DEV_TASKS, TASKS

    loaded = task_manager({"moekit_data_dir": str(DATA)}).load([TASKS[t].local_name for t in DEV_TASKS])["tasks"]
    expect = {"arc_easy": 2376, "openbookqa": 500, "social_iqa": 1954}
    for name, n in expect.items():
        task = loaded[name]
        docs = task.eval_docs
        assert len(docs) == n
        doc = docs[0]
        choices = task.doc_to_choice(doc)
        assert 0 <= task.doc_to_target(doc) < len(choices)
    siqa = loaded["social_iqa"]
    assert siqa.doc_to_target(siqa.eval_docs[0]) == int(siqa.eval_docs[0]["label"]) - 1


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason="../shared/data/dev is absent (offline dev data)")
def test_smollm2_arc_easy_few_items(smollm2):
    from moekit.eval.harness import evaluate

    model, tok = smollm2
    a = evaluate(model, tok, tasks=["arc_easy"], data_dir=DATA, limit=12, batch_size=16)
    b = evaluate(model, tok, tasks=["arc_easy"], data_dir=DATA, limit=12, batch_size=16, reuse_context=False)
    assert a["tasks"]["arc_easy"]["acc"] == b["tasks"]["arc_easy"]["acc"]
    assert a["tasks"]["arc_easy"]["acc_norm"] == b["tasks"]["arc_easy"]["acc_norm"]
    assert a["tasks"]["arc_easy"]["acc"] > 0.25  # well above chance on easy science questions


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data/dev is absent (offline dev data)")
def test_every_dev_task_and_mmlu_run_offline():
    from moekit.eval.harness import DEV_TASKS, evaluate

    r = evaluate(tiny(), letters_tokenizer(), tasks=[*DEV_TASKS, "mmlu"], data_dir=DATA, limit=2, batch_size=32)
    t = r["tasks"]
    assert [t[k]["n"] for k in DEV_TASKS] == [2, 2, 2]
    assert t["mmlu"]["n"] == 2 * 57  # the limit applies to each of the 57 subjects
    assert t["social_iqa"]["acc_norm"] is None  # the harness defines only acc for social_iqa
    for k in (*DEV_TASKS, "mmlu"):
        want = "acc" if k in ("social_iqa", "mmlu") else "acc_norm"
        assert 0.0 <= t[k]["summary"] <= 1.0 and t[k]["summary_metric"] == want
    assert r["data"]["mmlu"]["records"] == 285


def test_fewshot_examples_come_from_the_local_file_without_the_item_itself(arc_dir):
    from moekit.eval.harness import task_manager

    task = task_manager({"moekit_data_dir": str(arc_dir)}).load(["arc_easy_local"])["tasks"]["arc_easy"]
    task.set_fewshot_seed(1234)
    doc = task.eval_docs[0]
    ctx = task.fewshot_context(doc, num_fewshot=7)  # all 7 other items of the 8
    assert ctx.count("What is item 0?") == 1 and ctx.rstrip().endswith("Answer:")
    assert all(f"What is item {i}?" in ctx for i in range(1, 8))


def test_dev_data_dir_follows_moekit_data(tmp_path, monkeypatch):
    from moekit.errors import MoekitError
    from moekit.eval.harness import dev_data_dir

    monkeypatch.delenv("MOEKIT_DATA", raising=False)
    assert dev_data_dir() is None  # nothing inside the package points at data
    (tmp_path / "dev").mkdir()
    monkeypatch.setenv("MOEKIT_DATA", str(tmp_path))
    assert dev_data_dir() == tmp_path / "dev"
    monkeypatch.setenv("MOEKIT_DATA", str(tmp_path / "absent"))
    with pytest.raises(MoekitError, match="MOEKIT_DATA"):
        dev_data_dir()


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data/dev is absent (offline dev data)")
def test_the_shared_dev_folder_holds_every_dev_task():
    from moekit.eval.harness import DEV_TASKS
    from moekit.eval.tasks import TASKS

    assert all((DATA / TASKS[t].file).is_file() for t in (*DEV_TASKS, "mmlu"))
