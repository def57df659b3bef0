"""Router distillation: after pruning, merging or re-routing, train only the routers to match the original model.

Most of what a model loses when its experts are pruned, merged or re-routed comes from the router no longer
matching the changed experts, and distilling the router alone wins much of it back (arXiv 2603.02217). So:

* what trains: each MoE layer's router weight (and bias, where the router has one: ``router_linear`` of
  :func:`moekit.core.arch.moe_layers`); with ``train_scale``, one scalar per layer multiplying the routed experts'
  output (a forward hook). After every optimizer step the scale is folded into the experts' down projections (and
  biases), the same fold as ``route``'s ``rescale``, and set back to 1: the model is a standard checkpoint at every
  step, so each checkpoint's model is the student as it is, and resuming needs only the optimizer's state.
  Selection-only biases (DeepSeek-V3's ``e_score_correction_bias``, LFM2's ``expert_bias``) get no gradient
  through the hard top-k: they stay as they are. With ``train_experts`` every MoE block trains whole: its routed
  experts, shared expert and shared-expert gate too (the scale is then left out: the down projections learn it);
  after re-routing to fewer active experts that wins back far more than the routers alone (bench/README.md).
  Everything else (attention, norms, embeddings, dense layers) is frozen.
* the loss and the loop: :func:`moekit.train.distill.distill_` (forward KL at T = 1 from the teacher's logits,
  AdamW, warm-up then cosine, progress bar, checkpoints in ``out``, ``resume``), the scales as its ``extra``
  tensors and the fold as its ``callback``.
* data: a [n, L] token tensor (a recipe's calibration tokens) or a text source packed into exactly the sequences
  the budget needs; the last ``heldout`` sequences are kept out of training and measure the KL before and after.

    distill_router_(pruned, RouterDistillConfig(max_tokens=65536), tokens="calib.jsonl", teacher=original,
                    tokenizer=tok)   # -> {"kl_heldout_before": ..., "kl_heldout_after": ..., "losses": [...], ...}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.core.keys import MEAN_OUT
from moekit.core.registry import register
from moekit.errors import MoekitError
from moekit.route.route import _scale_experts
from moekit.train.distill import DistillConfig, distill_, forward_kl


@dataclass
class RouterDistillConfig(DistillConfig):
    """:class:`DistillConfig` (the loop's settings) with router-sized defaults, a token budget and a held-out slice."""

    steps: int = 32
    lr: float = 1e-4  # 1e-3 raised the held-out KL on smollm2-moe (bench/README.md, router distillation)
    batch_size: int = 4
    seq_len: int = 512
    warmup_steps: int = 2
    max_tokens: int | None = None  # training-token budget: steps = max_tokens // (batch_size * seq_len)
    heldout: int = 4  # sequences kept out of training: KL to the teacher on them before and after
    train_router: bool = True  # router weights (and biases)
    train_scale: bool = True  # one output scale per layer, folded into the experts' down projections
    train_experts: bool = False  # also every MoE block's experts, shared expert and gates (the scale is then off)

    def validate(self) -> None:
        super().validate()
        if self.max_tokens is not None and self.max_tokens < self.batch_size * self.seq_len:
            raise MoekitError(f"a budget of {self.max_tokens} tokens is less than one step ({self.batch_size} x "
                              f"{self.seq_len} tokens): raise --tokens or lower --batch-size / --seq-len")
        if self.heldout < 0:
            raise MoekitError(f"heldout {self.heldout} must be 0 (none) or a number of sequences")
        if not (self.train_router or self.train_scale or self.train_experts):
            raise MoekitError("nothing to train: keep train_router, train_scale or train_experts")


@register("distill_router", RouterDistillConfig, needs=("tokens", "teacher"))
def distill_router_(student, cfg: RouterDistillConfig, *, tokens=None, teacher=None, stats=None, tokenizer=None,
                    callback=None) -> dict:
    """Train ``student``'s routers (and per-layer output scales) in place to match ``teacher``'s logits.

    ``tokens``: a [n, L] token tensor or a text source (read through ``tokenizer``). ``callback(step)`` runs after
    every step, the scales folded. Returns the loop's report (steps, tokens, seconds, losses) plus the held-out KL
    before and after, the trained parameter count and each layer's scale (its product over this run's steps).
    ``stats`` is unused."""
    if tokens is None or teacher is None:
        raise MoekitError("router distillation needs tokens=(a [n, L] tensor or a text source) and teacher=(a model)")
    cfg.validate()
    layers = arch.require_moe(student)
    seq_len = min(cfg.seq_len, tokens.shape[1]) if isinstance(tokens, torch.Tensor) else cfg.seq_len
    steps = cfg.max_tokens // (cfg.batch_size * seq_len) if cfg.max_tokens else cfg.steps
    cfg = dataclasses.replace(cfg, steps=steps, seq_len=seq_len)
    train, held = split_tokens(tokens, tokenizer, cfg)

    kl_before = heldout_kl(student, teacher, held, cfg.batch_size)
    flags = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    # the router linear's own parameters (LongCat-Flash's zero-expert rows included: router_weight is a view there)
    routers = [t for layer in layers for t in (layer.router_linear.weight, getattr(layer.router_linear, "bias", None))
               if t is not None]
    for p in routers if cfg.train_router else ():
        p.requires_grad_(True)
    for p in (p for layer in layers for p in layer.block.parameters()) if cfg.train_experts else ():
        p.requires_grad_(True)
    device = torch.device(cfg.device) if cfg.device else next(student.parameters()).device
    use_scale = cfg.train_scale and not cfg.train_experts
    scales = {layer.index: torch.ones((), device=device, requires_grad=True) for layer in layers} if use_scale else {}
    total = dict.fromkeys(scales, 1.0)

    def after_step(step: int) -> None:
        for idx, c in fold_scales(layers, scales).items():
            total[idx] *= c
        if callback is not None:
            callback(step)

    n_trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    try:
        with Hooks() as hooks:
            for layer in layers if scales else ():
                hooks.forward(layer.experts, scale_hook(layer, scales[layer.index]))
            report = distill_(student, cfg, tokens=train, teacher=teacher, tokenizer=tokenizer,
                              extra=list(scales.values()), callback=after_step)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    report.update(kl_heldout_before=kl_before, kl_heldout_after=heldout_kl(student, teacher, held, cfg.batch_size),
                  heldout_tokens=int(held.numel()), trained_parameters=n_trained + len(scales), scales=total)
    return report


def split_tokens(tokens, tokenizer, cfg: RouterDistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows): a tensor's last ``heldout`` rows are held out; a text source is packed into
    the ``steps * batch_size`` training sequences the run needs plus the held-out ones."""
    if not isinstance(tokens, torch.Tensor):
        if tokenizer is None:
            raise MoekitError("router distillation from a text source needs the student's tokenizer")
        from moekit.data import calibration_tokens

        tokens = calibration_tokens(str(tokens), tokenizer, n_seq=cfg.steps * cfg.batch_size + cfg.heldout,
                                    seq_len=cfg.seq_len, field=cfg.field, seed=cfg.seed)
    if tokens.dim() != 2 or tokens.shape[0] <= cfg.heldout:
        raise MoekitError(f"{tuple(tokens.shape)} tokens leave no training sequence after {cfg.heldout} held out: "
                          "give more text or lower heldout")
    n = tokens.shape[0] - cfg.heldout
    return tokens[:n, : cfg.seq_len], tokens[n:, : cfg.seq_len]


@torch.no_grad()
def heldout_kl(student, teacher, held: torch.Tensor, batch_size: int) -> float | None:
    """Mean per-token KL(teacher || student) on ``held`` [n, L]; None when nothing is held out."""
    if held.numel() == 0:
        return None
    dev, tdev = next(student.parameters()).device, next(teacher.parameters()).device
    total = 0.0
    for b in held.split(batch_size):
        s = student(b.to(dev), use_cache=False).logits
        t = teacher(b.to(tdev), use_cache=False).logits.to(dev)
        total += float(forward_kl(s, t)) * b.numel()
    return total / held.numel()


def scale_hook(layer, scale: torch.Tensor):
    """A forward hook on ``layer``'s experts multiplying their output by ``scale`` the way folding it into the down
    projections does (:func:`fold_scales`): the zero experts' identity output, which LongCat-Flash's experts add
    inside their own forward on transformers 5.24, stays unscaled."""
    inside = layer.num_zero_experts and not layer.zero_experts_in_block

    def hook(_module, args, out):
        s = scale.to(out.dtype)
        if not inside:
            return out * s
        identity = layer.zero_expert_output(*args[:3]).to(out.dtype)  # (hidden states, indices, weights)
        return (out - identity) * s + identity

    return hook


@torch.no_grad()
def fold_scales(layers, scales: dict[int, torch.Tensor]) -> dict[int, float]:
    """Multiply each layer's routed experts by its scale for good (down projection, its bias, compensation means)
    and set the scale back to 1; returns the scales folded, by layer."""
    folded = {}
    for layer in layers:
        if layer.index not in scales:
            continue
        c = folded[layer.index] = float(scales[layer.index])
        _scale_experts(layer, c)
        mean = getattr(layer.experts, MEAN_OUT, None)
        if mean is not None:
            mean.mul_(c)
        scales[layer.index].fill_(1.0)
    return folded
