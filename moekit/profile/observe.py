"""Instrumenting a model's MoE layers so that one ordinary forward pass gathers every expert statistic.

:func:`observe` is a context manager. Inside it each MoE block's experts module runs an instrumented
forward (installed on the instance, removed on exit) that computes each expert's output only on the
tokens the router sent to it -- the same work the module's own forward does -- and accumulates the
statistics of :mod:`moekit.stats` from those very outputs. A forward hook on the router records the
routing; hooks on the decoder layers record the hidden-state maxima and, optionally, the attention mass
on the first token. Accumulators live on the model's device (fp32 sums, float64 counts).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from moekit.core.arch import MoELayer, decoder_layers
from moekit.core.hooks import Hooks

PER_EXPERT = ("rank_counts", "prob_mass", "selected_prob", "weight_sum", "reap_sum", "norm_sum", "sq_norm_sum",
              "weighted_out", "down_max")


class LayerAccumulator:
    """Running sums for one MoE layer (see :mod:`moekit.stats` for the meaning of each name)."""

    def __init__(self, layer: MoELayer, device, gram: bool = False):
        e, k, h = layer.num_experts, layer.top_k, layer.hidden_size
        f64 = {"device": device, "dtype": torch.float64}
        f32 = {"device": device, "dtype": torch.float32}
        self.layer = layer
        self.rank_counts = torch.zeros(e, k, **f64)
        self.prob_mass = torch.zeros(e, **f64)
        self.selected_prob = torch.zeros(e, **f64)
        self.weight_sum = torch.zeros(e, **f64)
        self.reap_sum = torch.zeros(e, **f64)
        self.norm_sum = torch.zeros(e, **f64)
        self.sq_norm_sum = torch.zeros(e, **f64)
        self.weighted_out = torch.zeros(e, h, **f32)
        self.down_max = torch.zeros(e, **f32)
        self.shared_down_max = torch.zeros(1, **f32) if layer.shared_expert is not None else None
        self.gram = torch.zeros(e, e, **f64) if gram else None
        self.sample_rows: torch.Tensor | None = None  # rows of the current batch in the Gram sample

    # ---------------------------------------------------------------- routing (router forward hook)
    def observe_routing(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        e, k = self.rank_counts.shape
        probs = self.layer.scores(logits.reshape(-1, logits.shape[-1]))
        idx = indices.reshape(-1, indices.shape[-1]).long()
        self.prob_mass += probs.sum(0, dtype=torch.float64)
        valid = idx < e
        sel = probs.gather(1, idx.clamp_max(e - 1)).double() * valid
        self.selected_prob.index_add_(0, idx.clamp_max(e - 1).flatten(), sel.flatten())
        ranks = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        flat = (idx * k + ranks)[valid]
        self.rank_counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    # ---------------------------------------------------------------- experts (instrumented forward)
    def experts_forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Same result as the experts module's own forward; statistics accumulated on the way.

        Each expert runs once on its routed tokens; its statistics are taken right after, while its output is
        still in cache, into per-slot buffers that are summed per expert at the end (few extra kernels)."""
        layer, e = self.layer, self.rank_counts.shape[0]
        t, k = indices.shape
        flat = indices.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=e + 1)[:e].tolist()  # one host sync per layer
        n_routed = sum(counts)
        order = order[:n_routed]  # drop "skip" slots (index >= E), sorted last
        rows, slots = order // k, order % k
        expert_of = flat[order]
        w_tok = weights.reshape(t, k).float()
        w = w_tok[rows, slots]
        g = (w_tok / w_tok.sum(-1, keepdim=True).clamp_min(1e-20))[rows, slots]  # top-k renormalised gate (REAP)

        f32 = {"device": x.device, "dtype": torch.float32}
        norms, peaks, h_sum = torch.empty(n_routed, **f32), torch.zeros(e, **f32), torch.zeros(e, x.shape[-1], **f32)
        out = torch.zeros_like(x)
        start = 0
        for ex, n in enumerate(counts):
            if not n:
                continue
            sl = slice(start, start + n)
            o = layer.expert_forward(ex, x[rows[sl]]).float()
            if layer.weights_scale_input:  # Llama-4: the weight scales the expert's input, E(w x) (o stays E(x))
                weighted = layer.expert_forward(ex, x[rows[sl]] * w[sl, None].to(x.dtype)).float()
            else:
                weighted = o * w[sl, None]
            out.index_add_(0, rows[sl], weighted.to(x.dtype))
            torch.linalg.vector_norm(o, dim=-1, out=norms[sl])
            torch.maximum(o.amax(), o.amin().neg(), out=peaks[ex])  # max |down_proj output| (no |o| temporary)
            torch.mv(o.T, w[sl], out=h_sum[ex])  # sum of w * E(x)
            start += n

        zero = layer.zero_expert_output(x, indices, weights)  # LongCat-Flash's identity experts (no statistics)
        if zero is not None:
            out += zero
        n64 = norms.double()
        self.norm_sum.index_add_(0, expert_of, n64)
        self.sq_norm_sum.index_add_(0, expert_of, n64 * n64)
        self.reap_sum.index_add_(0, expert_of, g.double() * n64)
        self.weight_sum.index_add_(0, expert_of, w.double())
        self.weighted_out += h_sum
        torch.maximum(self.down_max, peaks, out=self.down_max)
        if self.gram is not None and self.sample_rows is not None and self.sample_rows.numel():
            xs = x[self.sample_rows.to(x.device)]
            o = torch.stack([layer.expert_forward(ex, xs).float() for ex in range(e)])  # [E, S, H]
            self.gram += torch.einsum("esh,fsh->ef", o, o).double()
        return out

    def observe_shared(self, down_out: torch.Tensor) -> None:
        self.shared_down_max = torch.maximum(self.shared_down_max, down_out.detach().float().abs().amax().reshape(1))

    def results(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in PER_EXPERT}
        if self.shared_down_max is not None:
            out["shared_down_max"] = self.shared_down_max
        if self.gram is not None:
            out["gram"] = self.gram
        return out


class ModelAccumulator:
    """Whole-model statistics: hidden-state max after each decoder layer, attention mass on token 0."""

    def __init__(self, num_layers: int, device, attn_sink: bool = False, num_heads: int = 0):
        self.hidden_max = torch.zeros(num_layers, device=device, dtype=torch.float32)
        self.sink_sum = torch.zeros(num_layers, num_heads, device=device, dtype=torch.float64) if attn_sink else None
        self.sink_count = torch.zeros(num_layers, device=device, dtype=torch.float64) if attn_sink else None

    def observe_hidden(self, i: int, h: torch.Tensor) -> None:
        peak = h.detach().abs().amax().float().to(self.hidden_max.device, non_blocking=True)
        self.hidden_max[i] = torch.maximum(self.hidden_max[i], peak)

    def observe_attention(self, i: int, probs: torch.Tensor | None) -> None:
        """probs [B, A, Tq, Tk] (eager attention); the first query is left out (it can only see token 0)."""
        if probs is None or self.sink_sum is None or probs.shape[-2] < 2:
            return
        a = probs.shape[1]
        self.sink_sum[i, :a] += probs[:, :, 1:, 0].double().sum(dim=(0, 2)).to(self.sink_sum.device)
        self.sink_count[i] += probs.shape[0] * (probs.shape[-2] - 1)

    def results(self) -> dict[str, torch.Tensor]:
        out = {"hidden_max": self.hidden_max}
        if self.sink_sum is not None:
            out["attn_sink"] = (self.sink_sum / self.sink_count.clamp_min(1)[:, None]).float()
        return out


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def observe_layer(acc: LayerAccumulator):
    """Instrument one MoE layer: router hook + instrumented experts forward (+ shared-expert hook)."""
    layer = acc.layer
    hooks = Hooks()
    hooks.forward(layer.router, lambda m, i, o: acc.observe_routing(*layer.routing(o)[::2]))
    shared = layer.shared_expert
    if shared is not None:
        target = getattr(shared, "down_proj", shared)
        hooks.forward(target, lambda m, i, o: acc.observe_shared(_first(o)))
    try:
        with layer.experts_patched(acc.experts_forward):
            yield acc
    finally:
        hooks.remove()


@contextmanager
def observe_model(model, acc: ModelAccumulator, offset: int = 0, layers=None):
    """Hooks on decoder layers (hidden-state max) and their attention (sink mass), removed on exit."""
    layers = decoder_layers(model) if layers is None else layers
    hooks = Hooks()
    for j, dl in enumerate(layers):
        i = offset + j
        hooks.forward(dl, lambda m, inp, out, i=i: acc.observe_hidden(i, _first(out)))
        if acc.sink_sum is not None and hasattr(dl, "self_attn"):
            hooks.forward(dl.self_attn, lambda m, inp, out, i=i: acc.observe_attention(
                i, out[1] if isinstance(out, tuple) and len(out) > 1 else None))
    try:
        yield acc
    finally:
        hooks.remove()


@contextmanager
def eager_attention(model, enabled: bool = True):
    """Temporarily switch to eager attention (attention probabilities are only returned there)."""
    if not enabled:
        yield
        return
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)
