"""Statistics for tiny models computed directly (the profiler's names, a minimal local computation)."""

from __future__ import annotations

import torch

from moekit import arch
from moekit.merge_fit import capture_inputs
from moekit.models import fingerprint
from moekit.stats import ExpertStats


@torch.no_grad()
def tiny_stats(model, tokens) -> ExpertStats:
    layers = arch.moe_layers(model)
    inputs = capture_inputs(model, layers, tokens)
    st = ExpertStats(meta={"fingerprint": fingerprint(model), "layers": [la.index for la in layers],
                           "num_layers": len(arch.decoder_layers(model)), "tokens": tokens.numel()})
    for layer in layers:
        x = inputs[layer.index].reshape(-1, layer.hidden_size)
        _, w, idx = layer.route(x)
        e_n, k = layer.num_experts, layer.top_k
        rank_counts = torch.zeros(e_n, k)
        weight_sum, reap, down_max = torch.zeros(e_n), torch.zeros(e_n), torch.zeros(e_n)
        weighted_out = torch.zeros(e_n, layer.hidden_size)
        for e in range(e_n):
            tok, pos = torch.nonzero(idx == e, as_tuple=True)
            rank_counts[e] = torch.bincount(pos, minlength=k).float()
            if len(tok) == 0:
                continue
            out = layer.expert_forward(e, x[tok])
            g = w[tok, pos].float()
            weight_sum[e] = g.sum()
            weighted_out[e] = (g[:, None] * out).sum(0)
            reap[e] = (g * out.norm(dim=-1)).sum()
            down_max[e] = out.abs().max()
        for name, v in {"rank_counts": rank_counts, "weight_sum": weight_sum, "weighted_out": weighted_out, "reap_sum": reap,
                            "down_max": down_max}.items():
            st.set(name, v, layer.index)
    st.set("hidden_max", torch.ones(len(arch.decoder_layers(model))))
    return st
