"""Knowledge distillation: train a whole student to match a teacher's next-token distribution.

Loss: forward KL(p_teacher || p_student) on the logits at temperature 1, averaged over tokens
(Kim et al. 2026 refine a densified MoE this way). Data streams: documents are tokenized as they are
needed and packed into ``seq_len`` windows (or rows of a token tensor are served), in a seeded order that
is replayed on resume. AdamW, linear warm-up then cosine decay to 10%, gradient clipping.

Checkpoints (every ``checkpoint_every`` steps and at the end) go to ``out/checkpoint-STEP/``: the student
saved with :func:`moekit.checkpoint.save.save_model` (safetensors, verified) plus ``trainer_state.safetensors``
(optimizer tensors; step, position in the data and loss history as JSON metadata). Each checkpoint is
written into a hidden temporary directory and renamed into place, so a crash never leaves a half
checkpoint; ``resume=True`` continues from the newest complete one. Nothing is ever unpickled.

Two hooks for methods built on this loop (router distillation, :mod:`moekit.train.router`): ``extra`` trainable
tensors kept outside the model (in the optimizer, not in the model's checkpoint: the method folds them into the
model in ``callback``), and ``callback(step)`` after every optimizer step, before that step's checkpoint (a
benchmark measures perplexity there too; the loop puts the student back in training mode after it).

On CPU everything runs in fp32. On CUDA the student keeps fp32 master weights under bf16 autocast with
gradient checkpointing, and the teacher runs in bf16.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moekit.core.keys import DISTILL_STATE_KEY
from moekit.core.registry import register
from moekit.errors import MoekitError

STATE_FILE = "trainer_state.safetensors"
CKPT_PREFIX = "checkpoint-"


@dataclass
class DistillConfig:
    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 4
    seq_len: int = 256
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    field: str = "text"
    out: str | None = None  # checkpoint directory (None: no checkpoints)
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    device: str | None = None  # None: the student's device
    gradient_checkpointing: bool | None = None  # None: on for CUDA
    progress: bool = True

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise MoekitError("distillation needs steps >= 1, batch size >= 1 and seq_len >= 2")
        if not self.lr > 0:
            raise MoekitError(f"learning rate {self.lr} must be positive")
        if self.resume and not self.out:
            raise MoekitError("resume needs the checkpoint directory: pass --out DIR")


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student) at temperature 1."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def sequences(data, tokenizer, cfg: DistillConfig) -> Iterator[torch.Tensor]:
    """An endless, seeded stream of [seq_len] windows from a token tensor or a text source."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.shape[1] < 2:
            raise MoekitError("token data must be a [n_seq, seq_len] tensor")
        epoch = 0
        while True:
            order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for i in order.tolist():
                yield data[i, : cfg.seq_len]
            epoch += 1
    if tokenizer is None:
        raise MoekitError("distilling from a text source needs the student's tokenizer")
    from moekit.data import load_texts

    texts = load_texts(str(data), field=cfg.field)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else None
    epoch, buf = 0, []
    while True:
        order = list(range(len(texts)))
        random.Random(cfg.seed + epoch).shuffle(order)
        for i in order:
            buf.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
            if sep is not None:
                buf.append(sep)
            while len(buf) >= cfg.seq_len:
                yield torch.tensor(buf[: cfg.seq_len], dtype=torch.long)
                buf = buf[cfg.seq_len :]
        epoch += 1
        if epoch > 1000:
            raise MoekitError(f"data '{data}' holds too little text for one {cfg.seq_len}-token window")


def batches(data, tokenizer, cfg: DistillConfig, skip: int = 0) -> Iterator[torch.Tensor]:
    stream = sequences(data, tokenizer, cfg)
    for _ in range(skip):
        next(stream)
    while True:
        yield torch.stack([next(stream) for _ in range(cfg.batch_size)])


@register("distill", DistillConfig, needs=("tokens", "teacher"))
def distill_(student, cfg: DistillConfig, *, tokens=None, teacher=None, stats=None, tokenizer=None, extra=None,
             callback=None) -> dict:
    """Train ``student`` in place to match ``teacher``'s logits (forward KL) on ``tokens``.

    ``tokens`` is a [n, L] token tensor, or a text source (a file, 'c4', 'hf:NAME') streamed through
    ``tokenizer`` into ``cfg.seq_len`` windows. The parameters that train are those with ``requires_grad``
    (all of a freshly loaded model; heal freezes all but the FFNs first), plus the leaf tensors in ``extra`` (not
    part of the model, so not in its checkpoints). ``callback(step)`` runs after every optimizer step, before the
    step's checkpoint. Returns what happened: steps run, tokens seen (this run and in total), seconds, tokens/s,
    losses.
    """
    if tokens is None or teacher is None:
        raise MoekitError("distillation needs tokens=(a [n, L] tensor or a text source) and teacher=(a model)")
    data = tokens
    cfg.validate()
    device = torch.device(cfg.device) if cfg.device else next(student.parameters()).device
    cuda = device.type == "cuda"
    student.to(device=device, dtype=torch.float32)
    teacher.to(device=device, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    use_gc = cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    if use_gc:
        student.gradient_checkpointing_enable()
    use_cache, student.config.use_cache = getattr(student.config, "use_cache", True), False
    params = [p for p in student.parameters() if p.requires_grad] + list(extra or ())
    if not params:
        raise MoekitError("the student has no trainable parameters (every requires_grad is False)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = 0, []
    if cfg.resume:
        start, history = _resume(student, opt, Path(cfg.out))
    out = Path(cfg.out) if cfg.out else None
    per_step = cfg.batch_size * cfg.seq_len
    data_iter = batches(data, tokenizer, cfg, skip=start * cfg.batch_size)
    student.train()
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(start, cfg.steps), desc="distill", disable=not cfg.progress, initial=start, total=cfg.steps)
    for step in bar:
        batch = next(data_iter).to(device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            with torch.no_grad():
                t_logits = teacher(batch).logits
            s_logits = student(batch).logits
        loss = forward_kl(s_logits, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if callback is not None:
            callback(step + 1)
            student.train()
        losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{len(losses) * per_step / max(elapsed, 1e-9):.0f}")
        done = step + 1
        if out is not None and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            _save_checkpoint(student, tokenizer, opt, out, done, history + losses, cfg)
    student.eval()
    if use_gc:
        student.gradient_checkpointing_disable()
    student.config.use_cache = use_cache
    seconds = time.perf_counter() - t0
    return {"start_step": start, "steps": cfg.steps, "steps_run": len(losses), "tokens_run": len(losses) * per_step,
            "tokens_total": cfg.steps * per_step, "seconds": seconds,
            "tokens_per_s": len(losses) * per_step / max(seconds, 1e-9), "losses": history + losses}


# ----------------------------------------------------------------------------- checkpoints
def latest_checkpoint(out: Path) -> Path | None:
    if not out.exists():
        return None
    done = [p for p in out.glob(f"{CKPT_PREFIX}*") if (p / STATE_FILE).exists() and p.name[len(CKPT_PREFIX):].isdigit()]
    return max(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]), default=None)


def _save_checkpoint(student, tokenizer, opt, out: Path, step: int, losses: list[float], cfg: DistillConfig) -> Path:
    from safetensors.torch import save_file

    from moekit.checkpoint.save import save_model
    from moekit.outputs import staged_dir

    final = out / f"{CKPT_PREFIX}{step:06d}"
    was_training = student.training
    student.eval()
    try:
        with staged_dir(final, overwrite=True) as tmp:  # a resumed run may write the same step again
            save_model(student, tokenizer, tmp / "model", overwrite=True, verify=True)
            tensors, groups = _flatten_optimizer(opt)
            meta = {"step": step, "losses": losses, "config": asdict(cfg), "param_groups": groups}
            save_file(tensors, str(tmp / STATE_FILE), metadata={DISTILL_STATE_KEY: json.dumps(meta)})  # writes inside a staged_dir
    finally:
        student.train(was_training)
    old = sorted(p for p in out.glob(f"{CKPT_PREFIX}*") if p.name[len(CKPT_PREFIX):].isdigit())
    for p in old[: max(len(old) - cfg.keep_checkpoints, 0)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _flatten_optimizer(opt) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _resume(student, opt, out: Path) -> tuple[int, list[float]]:
    from safetensors import safe_open

    from moekit.checkpoint.read import read_dir  # a checkpoint directory: no model names, no embedded builds

    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise MoekitError(f"no complete checkpoint under '{out}' to resume from: run without --resume first")
    ref = next(student.parameters())
    saved, _ = read_dir(ckpt / "model", ref.dtype, False, None)
    missing, unexpected = student.load_state_dict(saved.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise MoekitError(f"checkpoint '{ckpt}' does not fit this student (missing {missing[:2]}, unexpected "
                          f"{unexpected[:2]}): resume with the same student model")
    with safe_open(str(ckpt / STATE_FILE), "pt") as f:
        meta = json.loads(f.metadata()[DISTILL_STATE_KEY])
        state: dict[int, dict] = {}
        if [len(g["params"]) for g in meta["param_groups"]] != [len(g["params"]) for g in opt.param_groups]:
            raise MoekitError(f"checkpoint '{ckpt}' trained other parameters: resume with the options it was started with")
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = f.get_tensor(key).to(ref.device)
    for s in state.values():
        if "step" in s:
            s["step"] = s["step"].cpu()
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta["losses"])
