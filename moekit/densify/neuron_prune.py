"""Width pruning of a dense model's FFNs by neuron importance (the control for densification).

Minitron's activation criterion (Muralidharan et al., "Compact Language Models via Pruning and Knowledge
Distillation", 2024): neuron i of an FFN is as important as the mean over calibration tokens of
|h_i(x)|, h = act(gate x) * (up x), the input of down_proj. Every layer keeps its ``width`` most
important neurons (in their original order), so the result is the same standard architecture with a
smaller ``intermediate_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.core.registry import register
from moekit.errors import MoekitError


@dataclass
class NeuronPruneConfig:
    width: int  # FFN neurons kept per layer
    batch_size: int = 4

    def validate(self) -> None:
        if self.width < 1 or self.batch_size < 1:
            raise MoekitError(f"width {self.width} and batch_size {self.batch_size} must be at least 1")


@torch.no_grad()
def neuron_importance(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> dict[int, torch.Tensor]:
    """Per decoder layer, the mean |input of down_proj| over ``tokens`` [n, L] -> [intermediate]."""
    sums: dict[int, torch.Tensor] = {}
    device = next(model.parameters()).device
    with Hooks() as hooks:
        for i, layer in enumerate(arch.decoder_layers(model)):
            def pre(_mod, args, i=i):
                h = args[0].detach().float().abs().flatten(0, -2).sum(0)
                sums[i] = sums.get(i, 0) + h
            hooks.pre(layer.mlp.down_proj, pre)
        for b in tqdm(range(0, tokens.shape[0], batch_size), desc="neuron importance", leave=False):
            model(tokens[b : b + batch_size].to(device))
    return {i: s.cpu() / tokens.numel() for i, s in sums.items()}


@register("prune_neurons", NeuronPruneConfig, needs=("tokens",))
@torch.no_grad()
def prune_neurons_(model: nn.Module, cfg: NeuronPruneConfig, *, tokens: torch.Tensor | None = None, stats=None,
                   teacher=None) -> dict:
    """Keep the ``cfg.width`` most important FFN neurons in every layer, in place.

    Returns the report: ``kept`` (decoder layer -> kept neuron indices) and the widths before and after.
    """
    if tokens is None:
        raise MoekitError("neuron pruning needs calibration tokens: pass tokens=[n, L] token ids")
    cfg.validate()
    if arch.is_moe(model):
        raise MoekitError("neuron pruning is for dense models; use `moekit prune` or `moekit densify` for an MoE")
    arch.check_supported(model)
    full = int(model.config.intermediate_size)
    if not 1 <= cfg.width <= full:
        raise MoekitError(f"width {cfg.width} must be between 1 and the FFN width {full}")
    scores = neuron_importance(model, tokens, cfg.batch_size)
    kept = {}
    for i, layer in enumerate(arch.decoder_layers(model)):
        mlp = layer.mlp
        keep = torch.sort(torch.topk(scores[i], cfg.width).indices).values
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            _replace(mlp, name, lin.weight[keep], None if lin.bias is None else lin.bias[keep])
        _replace(mlp, "down_proj", mlp.down_proj.weight[:, keep], mlp.down_proj.bias)
        if getattr(mlp, "intermediate_size", None) is not None:
            mlp.intermediate_size = cfg.width
        kept[i] = keep
    model.config.intermediate_size = cfg.width
    return {"kept": kept, "width_before": full, "width_after": cfg.width}


def _replace(mlp: nn.Module, name: str, weight: torch.Tensor, bias) -> None:
    old = getattr(mlp, name)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    setattr(mlp, name, new)
