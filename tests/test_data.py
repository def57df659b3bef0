"""Text sources, packing, and their bad-input errors."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from moekit.data import calibration_tokens, load_texts, pack
from moekit.errors import MoekitError

DOCS = ["The first document is here.", "A second one, a little longer than the first.", "Third."]


def write(path, docs=DOCS, field="text"):
    name = str(path)
    if name.endswith(".txt"):
        path.write_text("\n\n".join(docs))
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps({field: d}) + "\n" for d in docs)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    elif name.endswith(".json"):
        path.write_text(json.dumps([{field: d} for d in docs]))
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({field: docs}), path)
    return str(path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet"])
def test_every_local_format_reads_the_same_documents(tmp_path, suffix):
    assert load_texts(write(tmp_path / f"d{suffix}")) == DOCS


def test_field_name_is_configurable_and_absent_field_named(tmp_path):
    f = write(tmp_path / "d.jsonl", field="body")
    assert load_texts(f, field="body") == DOCS
    with pytest.raises(MoekitError, match="record 1 has no field 'text'.*body.*--field"):
        load_texts(f)


def test_malformed_line_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(MoekitError, match="line 2 is not valid JSON"):
        load_texts(str(f))


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.jsonl"), "does not exist"),
    (lambda p: ((p / "e.jsonl").write_text(""), str(p / "e.jsonl"))[1], "is empty"),
    (lambda p: ((p / "d.csv").write_text("a"), str(p / "d.csv"))[1], "not a supported file"),
])
def test_bad_files(tmp_path, make, message):
    with pytest.raises(MoekitError, match=message):
        load_texts(make(tmp_path))


def test_pack_is_deterministic_for_a_seed(tmp_path, char_tokenizer):
    texts = [f"document number {i} " * 5 for i in range(40)]
    a = pack(char_tokenizer, texts, 4, 64, seed=0)
    b = pack(char_tokenizer, texts, 4, 64, seed=0)
    c = pack(char_tokenizer, texts, 4, 64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_too_few_tokens_for_one_sequence(tmp_path, char_tokenizer):
    f = write(tmp_path / "d.jsonl")
    with pytest.raises(MoekitError, match="fewer than one sequence of 4096"):
        calibration_tokens(f, char_tokenizer, n_seq=2, seq_len=4096)
