"""Text for calibration and perplexity: local files, hub datasets, or text the model writes itself.

A *source* is a string:

* a local ``.txt`` (documents separated by blank lines), ``.jsonl``, ``.jsonl.gz``, ``.json`` or
  ``.parquet`` file, records read from ``field`` (default ``text``);
* ``c4`` (C4 English train, the Samsung AI Challenge 2025 pipeline's calibration set) or ``hf:NAME[:CONFIG[:SPLIT]]``,
  streamed with ``datasets`` when online;
* ``self``: text sampled from the model itself, for when no data is at hand.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch

from moekit.errors import MoekitError, reading

LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json", ".parquet")
HUB_ALIASES = {"c4": ("allenai/c4", "en", "train"), "c4-validation": ("allenai/c4", "en", "validation")}


def load_texts(source: str, *, field: str = "text", max_docs: int | None = None, model=None, tokenizer=None,
               seed: int = 0) -> list[str]:
    """Documents from ``source`` (see module doc), at most ``max_docs``."""
    if source == "self":
        if model is None or tokenizer is None:
            raise MoekitError("data 'self' needs the model and its tokenizer to sample text from")
        return sample_self_text(model, tokenizer, n_docs=max_docs or 16, seed=seed)
    if source in HUB_ALIASES or source.startswith("hf:"):
        return _hub_texts(source, field, max_docs)
    path = Path(source).expanduser()
    if not path.exists():
        raise MoekitError(f"data file '{source}' does not exist: give a .txt/.jsonl/.json/.parquet file, 'c4', 'hf:NAME' or 'self'")
    if path.is_dir() or not str(path).endswith(LOCAL_SUFFIXES):
        raise MoekitError(f"data '{source}' is not a supported file: use one of {', '.join(LOCAL_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise MoekitError(f"data file '{source}' is empty: give a file with at least one document")
    with reading(path, "data file", "give UTF-8 text (.txt) or JSON records (.jsonl/.json) or parquet"):
        texts = _read_local(path, field, max_docs)
    if not texts:
        raise MoekitError(f"data file '{source}' holds no non-empty '{field}' text")
    return texts


def _read_local(path: Path, field: str, max_docs: int | None) -> list[str]:
    name = str(path)
    if name.endswith(".txt"):
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
        return [d for d in docs if d][:max_docs]
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise MoekitError(f"'{path}' has no column '{field}' (columns: {', '.join(table.column_names)}); pass --field")
        return [t for t in table.column(field).to_pylist()[:max_docs] if t]
    if name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise MoekitError(f"'{path}' is not valid JSON (line {e.lineno}): fix or re-export the file") from None
        records = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise MoekitError(f"'{path}' must hold a list of records (or {{\"data\": [...]}})")
        return [_field(r, field, path, i + 1) for i, r in enumerate(records[:max_docs])]
    opener = gzip.open if name.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise MoekitError(f"'{path}' line {lineno} is not valid JSON: fix or remove that line") from None
            out.append(_field(record, field, path, lineno))
            if max_docs and len(out) >= max_docs:
                break
    return [t for t in out if t]


def _field(record, field: str, path: Path, lineno: int) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise MoekitError(f"'{path}' record {lineno} has no field '{field}' (it has: {keys}); pass --field NAME")
    value = record[field]
    if not isinstance(value, str):
        raise MoekitError(f"'{path}' record {lineno}: field '{field}' is not text")
    return value


def _hub_texts(source: str, field: str, max_docs: int | None) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError:
        raise MoekitError("hub datasets need the `datasets` package: pip install datasets") from None
    if source in HUB_ALIASES:
        name, config, split = HUB_ALIASES[source]
    else:
        parts = source[3:].split(":")
        name, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")
    try:
        ds = load_dataset(name, config, split=split, streaming=True)
        out = []
        for record in ds:
            out.append(record[field])
            if len(out) >= (max_docs or 2048):
                break
    except Exception as e:  # network, missing dataset, missing field
        raise MoekitError(f"cannot read hub dataset '{source}' ({type(e).__name__}: {str(e)[:80]}); check the name and network, or pass a local file") from None
    return out


@torch.no_grad()
def sample_self_text(model, tokenizer, n_docs: int = 16, length: int = 256, seed: int = 0) -> list[str]:
    """Documents sampled from the model itself (temperature 1), starting from BOS."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    start = torch.full((n_docs, 1), bos, dtype=torch.long, device=device)
    out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0, top_k=0,
                         max_new_tokens=length, pad_token_id=tokenizer.eos_token_id)
    return [t for t in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True) if t.strip()]


def tokenize_stream(tokenizer, texts: list[str], max_tokens: int | None = None, separator: str = "\n\n") -> torch.Tensor:
    """Documents joined by ``separator`` and tokenized, in order, truncated to ``max_tokens``."""
    ids: list[int] = []
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"]
    for i, t in enumerate(texts):
        if i:
            ids.extend(sep)
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def pack(tokenizer, texts: list[str], n_seq: int, seq_len: int, *, seed: int = 0, source: str = "data") -> torch.Tensor:
    """``n_seq`` sequences of ``seq_len`` tokens: documents shuffled by ``seed``, joined, cut into windows."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    need = n_seq * seq_len
    stream = tokenize_stream(tokenizer, [texts[i] for i in order], max_tokens=need)
    if stream.numel() < seq_len:
        raise MoekitError(f"{source} has only {stream.numel()} tokens, fewer than one sequence of {seq_len}: give more text or a shorter --seq-len")
    if stream.numel() < need:
        n_seq = stream.numel() // seq_len
    return stream[: n_seq * seq_len].view(n_seq, seq_len)


def calibration_tokens(source: str, tokenizer, *, n_seq: int = 32, seq_len: int = 512, field: str = "text",
                       seed: int = 0, model=None) -> torch.Tensor:
    """Load ``source`` and pack it into [n_seq, seq_len] token ids."""
    texts = load_texts(source, field=field, model=model, tokenizer=tokenizer, seed=seed,
                       max_docs=max(64, n_seq * seq_len // 64) if source == "self" else None)
    return pack(tokenizer, texts, n_seq, seq_len, seed=seed, source=f"data '{source}'")


def describe_source(source: str, field: str, tokens: torch.Tensor, seed: int) -> dict:
    return {"source": str(source), "field": field, "n_seq": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
            "tokens": int(tokens.numel()), "seed": seed}
