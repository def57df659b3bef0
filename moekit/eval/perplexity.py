"""Perplexity over fixed, non-overlapping windows, batched.

The reference setting for the embedded default: documents joined by blank lines, the first 65,536
tokens, 1024-token windows, fp32 (SmolLM2-135M-Instruct gets about 31 on the shared C4 dev file).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from moekit.data import load_texts, tokenize_stream
from moekit.errors import MoekitError


def windows(tokenizer, source: str, *, max_tokens: int = 65536, window: int = 1024, field: str = "text") -> torch.Tensor:
    """[n_windows, window] token ids from ``source`` (documents in file order, joined by blank lines)."""
    if max_tokens < 1:
        raise MoekitError(f"--max-tokens {max_tokens} must be at least one window ({window}): perplexity over nothing is undefined")
    if window < 2:
        raise MoekitError(f"--window {window} must be at least 2 tokens (one prediction)")
    texts = load_texts(source, field=field)
    stream = tokenize_stream(tokenizer, texts, max_tokens=max_tokens)
    n = stream.numel() // window
    if n == 0:
        raise MoekitError(f"data '{source}' has {stream.numel()} tokens, fewer than one {window}-token window: give more text or a smaller --window")
    return stream[: n * window].view(n, window)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, *, batch_size: int = 4, progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every window in ``tokens`` [n, L] (each window scored on its own)."""
    if batch_size < 1:
        raise MoekitError(f"--batch-size {batch_size} must be at least 1")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        batch = tokens[i : i + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        nll += loss.item()
        count += target.numel()
    return math.exp(nll / count)


@torch.no_grad()
def perplexity_sequential(path, tokens: torch.Tensor, *, batch_size: int = 4, progress: bool = True, device=None,
                          dtype=None) -> float:
    """:func:`perplexity` of the checkpoint at ``path`` computed one decoder layer at a time
    (:mod:`moekit.sequential.engine`): the memory of one layer and the windows' hidden states."""
    from moekit.sequential.engine import LayerSequential

    if batch_size < 1:
        raise MoekitError(f"--batch-size {batch_size} must be at least 1")
    engine = LayerSequential(path, tokens, device=device, dtype=dtype, batch_size=batch_size, progress=progress,
                             desc="perplexity (layer-sequential)")
    for layer in engine:
        layer.forward()
    nll, count = engine.nll(tokens)
    return math.exp(nll / count)
