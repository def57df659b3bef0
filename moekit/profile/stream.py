"""Memory-bounded profiling: the profile on the layer-sequential engine (:mod:`moekit.sequential.engine`).

Each decoder layer is read from the checkpoint on disk, the calibration hidden states run through it with the
same instrumentation as the in-memory profiler (:func:`moekit.profile.profile`), and it is freed. Peak memory:
one layer, the embedding rows of the tokens used, and the hidden states.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from moekit.core import arch
from moekit.profile.observe import LayerAccumulator, ModelAccumulator, observe_layer, observe_model
from moekit.profile.profile import ProfileConfig, build_stats, check_tokens, gram_sample, model_meta, num_heads, rows_in
from moekit.profile.stats import ExpertStats
from moekit.sequential.engine import Layer, LayerSequential


class LayerProfiler:
    """The profile's statistics gathered one layer at a time: :meth:`observe` runs a layer's calibration forward
    under the accumulators, :meth:`stats` builds the result. Other layer-sequential methods use it too (prune,
    merge ... profile and transform in the same walk)."""

    def __init__(self, engine: LayerSequential, config: ProfileConfig, tokens: torch.Tensor):
        self.engine, self.config, self.tokens = engine, config, tokens
        self.accs: list[LayerAccumulator] = []
        self.router_weights: list[torch.Tensor] = []
        self.model_acc = ModelAccumulator(len(engine.layers), engine.device, attn_sink=config.attn_sink,
                                          num_heads=num_heads(engine.model.config))
        self.sample = gram_sample(tokens.numel(), config.gram_tokens, config.seed)

    def observe(self, layer: Layer, update: bool = True) -> LayerAccumulator | None:
        """Run the calibration states through ``layer`` with the profile's hooks; its accumulator (None: no experts)."""
        seq_len = self.tokens.shape[1]
        with ExitStack() as stack:
            stack.enter_context(observe_model(self.engine.model, self.model_acc, offset=layer.index, layers=[layer.module]))
            acc = None
            if layer.moe is not None:
                acc = LayerAccumulator(layer.moe, layer.device, gram=self.config.gram_tokens > 0)
                stack.enter_context(observe_layer(acc))
                self.accs.append(acc)
                self.router_weights.append(layer.moe.router_weight.detach().float().cpu().clone())
            for a, b in self.engine.batches:
                if acc is not None:
                    acc.sample_rows = rows_in(self.sample, a * seq_len, b * seq_len, layer.device)
                layer.forward_batch(a, b, update=update)
        return acc

    def stats(self) -> ExpertStats:
        moe = arch.require_moe(self.engine.model)
        meta = model_meta(self.engine.model, moe, router_weights=self.router_weights)
        meta["stream"] = True
        return build_stats(meta, self.accs, self.model_acc, self.tokens, self.config)


@torch.no_grad()
def profile_stream(name: str | Path, tokens: torch.Tensor, config: ProfileConfig | None = None, *,
                   device: str | None = None, dtype=None) -> ExpertStats:
    """Same statistics as :func:`moekit.profile.profile`, with one decoder layer in memory at a time."""
    config = config or ProfileConfig()
    tokens = check_tokens(tokens)
    engine = LayerSequential(name, tokens, device=device, dtype=dtype, batch_size=config.batch_size,
                             progress=config.progress, desc="profile (layer-sequential)",
                             attention="eager" if config.attn_sink else None)
    arch.require_moe(engine.model)
    profiler = LayerProfiler(engine, config, tokens)
    for layer in engine:
        profiler.observe(layer)
    return profiler.stats()
