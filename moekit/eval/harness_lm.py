"""The harness's HF wrapper over an in-memory model, scoring a question's choices from one pass over its context.

lm-evaluation-harness scores a multiple-choice item as one request per choice, ``(context, continuation)``,
and runs ``context + continuation`` through the model for each. :class:`ReuseContextLM` keeps everything of
``HFLM`` (tokenisation, request building, caching hooks, generation) and replaces only
``_loglikelihood_tokens``: requests are grouped by their context tokens, and

1. each distinct context runs once: ``batch_size`` contexts per pass, sorted by length, left-padded (masked,
   positions counted from each context's first token), keeping only the last position's logits;
2. the continuations of those contexts run from the KV cache: sorted by length and cut into chunks of
   ``batch_size`` rows, each row a copy of its context's cache, positions continuing its context.

The log-probabilities are the harness's up to floating-point rounding (tested against ``HFLM`` itself).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm


class ReuseContextLM(HFLM):
    """``HFLM`` over a model object whose loglikelihood runs each distinct context once."""

    def __init__(self, model, tokenizer, batch_size: int = 16, reuse_context: bool = True, **kw):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)
        self.reuse_context = reuse_context

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if not self.reuse_context or self.backend != "causal" or not requests:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results: list = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        too_long = []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) + len(cont) > self.max_length or not ctx:
                too_long.append(i)  # the harness's own path truncates from the left
            else:
                groups.setdefault(tuple(ctx), []).append(i)
        if too_long:
            plain = super()._loglikelihood_tokens([requests[i] for i in too_long], disable_tqdm=True)
            for i, r in zip(too_long, plain, strict=True):
                results[i] = r
        # longest first, as the harness does: time estimates are upper bounds and memory errors come early
        order = sorted(groups, key=len, reverse=True)
        size = max(int(self.batch_size) if str(self.batch_size).isdigit() else 16, 1)
        pbar = tqdm(total=len(requests) - len(too_long), disable=disable_tqdm or self.rank != 0,
                    desc="Scoring choices (shared contexts)")
        for start in range(0, len(order), size):
            batch = order[start: start + size]
            idx = [groups[c] for c in batch]
            scores = self._score_contexts(batch, [[requests[i][2] for i in g] for g in idx], size)
            for g, sc in zip(idx, scores, strict=True):
                for i, answer in zip(g, sc, strict=True):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(len(g))
        pbar.close()
        return results

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    @torch.no_grad()
    def _score_contexts(self, contexts: list[tuple[int, ...]], conts: list[list[list[int]]], rows_per_pass: int):
        """(log-prob, is-greedy) of every continuation of every context."""
        dev = self.device
        lens = [len(c) for c in contexts]
        width = max(lens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # left-padded, so every context ends at the last column and only that column's logits are needed
        ids = torch.full((len(contexts), width), pad, dtype=torch.long, device=dev)
        ctx_mask = torch.zeros((len(contexts), width), dtype=torch.long, device=dev)
        for b, c in enumerate(contexts):
            ids[b, width - len(c):] = torch.tensor(c, dtype=torch.long)
            ctx_mask[b, width - len(c):] = 1
        ctx_pos = (ctx_mask.cumsum(1) - 1).clamp(min=0)
        with self._autocast():
            out = self.model(input_ids=ids, attention_mask=ctx_mask, position_ids=ctx_pos, use_cache=True,
                             logits_to_keep=1)
        # [B, V]: the distribution of each context's first continuation token
        first = F.log_softmax(out.logits[:, -1], dim=-1, dtype=self.softmax_dtype)
        rows = sorted(((b, j) for b, cs in enumerate(conts) for j in range(len(cs))), key=lambda r: -len(conts[r[0]][r[1]]))
        answers: list[list] = [[None] * len(cs) for cs in conts]
        for start in range(0, len(rows), rows_per_pass):
            chunk = rows[start: start + rows_per_pass]
            flat = [conts[b][j] for b, j in chunk]
            rest = self._continuations(out.past_key_values, ctx_mask, lens, [b for b, _ in chunk], flat, pad)
            for r, ((b, j), c) in enumerate(zip(chunk, flat, strict=True)):
                dist = first[b][None] if len(c) == 1 else torch.cat([first[b][None], rest[r, : len(c) - 1]], 0)
                target = torch.tensor(c, dtype=torch.long, device=dev)
                answers[b][j] = (float(dist.gather(1, target[:, None]).sum()), bool((dist.argmax(-1) == target).all()))
        return answers

    def _continuations(self, cache, ctx_mask, lens, owner: list[int], flat: list[list[int]], pad: int):
        """Log-probs [rows, L-1, V] of each continuation's tokens after the first, from a copy of its context's cache."""
        rest_len = max(len(c) for c in flat) - 1
        if rest_len == 0:
            return None
        dev, width = ctx_mask.device, ctx_mask.shape[1]
        cache = copy.deepcopy(cache)
        cache.reorder_cache(torch.tensor(owner, device=dev))
        inp = torch.full((len(flat), rest_len), pad, dtype=torch.long, device=dev)
        mask = torch.cat([ctx_mask[owner], torch.zeros((len(flat), rest_len), dtype=torch.long, device=dev)], 1)
        pos = torch.zeros((len(flat), rest_len), dtype=torch.long, device=dev)
        for r, (b, c) in enumerate(zip(owner, flat, strict=True)):
            k = len(c) - 1
            inp[r, :k] = torch.tensor(c[:-1], dtype=torch.long)
            mask[r, width: width + k] = 1
            pos[r] = lens[b] + torch.arange(rest_len)
        with self._autocast():
            logits = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True).logits
        return F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
