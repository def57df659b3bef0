"""One-pass expert profiling: every statistic in :mod:`moekit.stats` from one forward pass.

    stats = profile(model, ProfileConfig(gram_tokens=256), tokens=tokens)
    stats.save("stats.safetensors")

Each expert runs only on the tokens the router sent to it (:mod:`moekit.observe`), so profiling costs
about one plain forward pass -- unlike an all-experts observer (REAP's default), which does E/k times
the expert work. ``stream=True`` profiles a checkpoint one decoder layer at a time (:mod:`moekit.stream`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moekit.profile.ablate import ablate, ablated
from moekit.core.arch import decoder_layers, require_moe
from moekit.core.registry import register
from moekit.errors import MoekitError
from moekit.profile.observe import LayerAccumulator, ModelAccumulator, eager_attention, observe_layer, observe_model
from moekit.profile.stats import ExpertStats


@dataclass
class ProfileConfig:
    batch_size: int = 4  # sequences per forward pass
    gram_tokens: int = 0  # > 0: Gram matrix of expert outputs on this many sampled tokens (all experts run on them)
    attn_sink: bool = False  # attention mass on the first token per head (switches to eager attention)
    seed: int = 0  # picks the Gram sample
    progress: bool = True
    data: dict = field(default_factory=dict)  # description of the calibration data, kept in the metadata

    def validate(self) -> None:
        if self.batch_size < 1:
            raise MoekitError(f"batch_size {self.batch_size} must be at least 1")
        if self.gram_tokens < 0:
            raise MoekitError(f"gram_tokens {self.gram_tokens} must be 0 (off) or a positive token count")


def check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() == 0:
        raise MoekitError("calibration tokens must be a non-empty [n_seq, seq_len] tensor of token ids; use moekit.data.calibration_tokens")
    if tokens.shape[1] < 2:
        raise MoekitError(f"calibration sequences of {tokens.shape[1]} token are too short; use --seq-len of at least 2")
    return tokens.long()


def gram_sample(n_tokens: int, n_sample: int, seed: int) -> torch.Tensor:
    """Sorted flat positions (over [n_seq * seq_len]) of the tokens every expert is run on for the Gram matrix."""
    n = min(int(n_sample), n_tokens)
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def rows_in(sample: torch.Tensor, start: int, stop: int, device) -> torch.Tensor:
    """Rows of a flattened batch covering flat positions [start, stop) that are in the sample."""
    sel = sample[(sample >= start) & (sample < stop)] - start
    return sel.to(device)


def num_heads(config) -> int:
    return int(getattr(config, "num_attention_heads", 0) or 0)


def build_stats(model_meta: dict, layer_accs: list[LayerAccumulator], model_acc: ModelAccumulator, tokens: torch.Tensor,
                config: ProfileConfig) -> ExpertStats:
    stats = ExpertStats(meta=dict(model_meta))
    stats.meta.update(tokens=int(tokens.numel()), data=dict(config.data) or {"n_seq": int(tokens.shape[0]),
                      "seq_len": int(tokens.shape[1])}, gram_tokens=int(config.gram_tokens), collected=[])
    for acc in layer_accs:
        for name, value in acc.results().items():
            stats.set(name, value, acc.layer.index)
    for name, value in model_acc.results().items():
        stats.set(name, value)
    return stats


def model_meta(model, layers, router_weights=None) -> dict:
    from moekit.profile.stats import fingerprint

    return {
        "fingerprint": fingerprint(model, router_weights),
        "layers": [layer.index for layer in layers],
        "num_layers": len(decoder_layers(model)),
        "top_k": max(layer.top_k for layer in layers),
        "top_k_per_layer": {str(layer.index): layer.top_k for layer in layers},
        "num_experts_per_layer": {str(layer.index): layer.num_experts for layer in layers},
        "model_type": model.config.model_type,
    }


@register("profile", ProfileConfig, needs=("tokens",))
@torch.no_grad()
def profile(model, cfg: ProfileConfig | None = None, *, tokens: torch.Tensor | None = None, stats=None,
            teacher=None) -> ExpertStats:
    """Run ``tokens`` [n_seq, seq_len] through ``model`` once and return every expert statistic (its report).

    ``model`` is not changed (hence no trailing underscore); ``stats`` and ``teacher`` are unused.
    """
    config = cfg or ProfileConfig()
    config.validate()
    layers = require_moe(model)
    tokens = check_tokens(tokens)
    device = next(model.parameters()).device
    n_layers = len(decoder_layers(model))
    # each layer's sums live beside its weights (a model spread over devices works too)
    layer_accs = [LayerAccumulator(layer, layer.router_weight.device, gram=config.gram_tokens > 0) for layer in layers]
    model_acc = ModelAccumulator(n_layers, device, attn_sink=config.attn_sink, num_heads=num_heads(model.config))
    sample = gram_sample(tokens.numel(), config.gram_tokens, config.seed)
    seq_len = tokens.shape[1]
    body = getattr(model, "model", model)
    with ExitStack() as stack:
        stack.enter_context(eager_attention(model, config.attn_sink))
        stack.enter_context(observe_model(model, model_acc))
        for acc in layer_accs:
            stack.enter_context(observe_layer(acc))
        for i in tqdm(range(0, tokens.shape[0], config.batch_size), desc="profile", disable=not config.progress):
            batch = tokens[i : i + config.batch_size]
            rows = rows_in(sample, i * seq_len, (i + batch.shape[0]) * seq_len, device)
            for acc in layer_accs:
                acc.sample_rows = rows
            body(input_ids=batch.to(device), use_cache=False)  # the decoder stack: logits are not needed
    return build_stats(model_meta(model, layers), layer_accs, model_acc, tokens, config)


__all__ = ["ProfileConfig", "ablate", "ablated", "profile"]
