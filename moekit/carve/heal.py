"""Healing: repair an MoE that carving, pruning or merging damaged, against a teacher (the dense source).

``heal_(moe, teacher, tokens, HealConfig(...))`` walks the decoder layers in order. For each MoE layer it
caches the layer's FFN inputs ``x`` *as the healed model so far produces them* and the teacher FFN's
outputs ``y = teacher_ffn(x)`` on the same inputs, then, in this order (each optional):

1. **router** — a standard linear router fitted in closed form: ridge regression of each token's
   per-expert log output energy ``log ||down_e h_e(x)||^2`` (centred per token; softmax ignores a
   per-token shift) on ``x``. Ranking by it approximates picking the experts that carry the most output.
2. **lstsq** — least-squares compensation: with the routing fixed, every expert's down projection (and the
   shared expert's) is refitted jointly so that the layer output best matches ``y`` (one ridge solve
   over the concatenated expert activations).
3. **local** — layer-wise local reconstruction: Adam on the layer's experts, shared expert and router to
   minimise ``||moe_ffn(x) - y||^2 / ||y||^2`` on the cached inputs. No gradient crosses layers; the next
   layer sees the healed layer's outputs, so errors do not pile up.

Then, optionally and end to end: **distill** (forward KL from the teacher's logits; worth it with a GPU)
and **finetune** (LoRA with peft, r=8 alpha=32, merged back so the export stays standard; or router-only),
with CMoE's load-balancing bias (gamma) nudging selection toward equal load during fine-tuning only.

The per-layer maths runs on the layer's canonical tensors (:mod:`moekit.arch`) with an all-experts masked
formulation (:func:`moe_ffn`) that equals the module's own forward (tested); results are written back
through ``MoELayer.replace_experts`` so the model stays a standard checkpoint. Healing supports softmax
top-k routers: Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.hooks import Hooks, inputs_of
from moekit.core.registry import register
from moekit.errors import MoekitError

HEAL_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
FINETUNES = ("none", "lora", "router")


@dataclass
class HealConfig:
    router: bool = True  # closed-form (ridge) router fit
    lstsq: bool = True  # least-squares refit of the down projections
    local_epochs: int = 4  # layer-wise local reconstruction epochs (0 = off)
    local_lr: float = 2e-4
    local_batch: int = 512  # tokens per Adam step
    router_ridge: float = 1e-2  # ridge strength, relative to the mean input energy
    lstsq_ridge: float | None = None  # ridge toward the carved weights (relative); None: chosen on held-out tokens
    router_target: str = "log_energy"  # or "topk": see fit_router
    router_spread: float | None = 0.05  # rescale fitted logits to this std (weights ~ 1); None: log-energy scale
    distill_steps: int = 0  # end-to-end forward-KL distillation steps (GPU users)
    distill_lr: float = 1e-5
    finetune: str = "none"  # "none", "lora" (peft, merged back) or "router" (router weights only)
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 32
    balance_gamma: float = 1e-3  # CMoE load-balancing bias step during fine-tuning (selection only)
    batch_size: int = 4  # sequences per forward pass
    seed: int = 0
    layers: list[int] | None = None  # heal only these decoder layers (None: all MoE layers)

    def validate(self) -> None:
        if self.finetune not in FINETUNES:
            raise MoekitError(f"finetune '{self.finetune}' is not one of {', '.join(FINETUNES)}")
        if self.router_target not in ("log_energy", "topk"):
            raise MoekitError(f"router_target '{self.router_target}' is not one of log_energy, topk")
        for name in ("local_epochs", "distill_steps", "finetune_steps"):
            if getattr(self, name) < 0:
                raise MoekitError(f"{name} {getattr(self, name)} must be >= 0 (0 = off)")
        if self.batch_size < 1 or self.local_batch < 1:
            raise MoekitError("batch_size and local_batch must be at least 1")


# ----------------------------------------------------------------------------- one layer, functionally
@dataclass
class LayerTensors:
    """Canonical tensors of one MoE layer (fp32): router [E,H], gate/up [E,I,H], down [E,H,I], shared expert."""

    router: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    top_k: int
    norm_topk: bool
    act: object
    s_gate: torch.Tensor | None = None  # shared expert gate_proj [Is,H]
    s_up: torch.Tensor | None = None
    s_down: torch.Tensor | None = None  # [H,Is]
    s_act: object = None
    s_sigmoid: torch.Tensor | None = None  # shared_expert_gate weight [1,H]

    def params(self) -> list[torch.Tensor]:
        names = ("router", "gate", "up", "down", "s_gate", "s_up", "s_down", "s_sigmoid")
        return [getattr(self, n) for n in names if getattr(self, n) is not None]


def read_layer(layer: arch.MoELayer) -> LayerTensors:
    if layer.family.name not in HEAL_FAMILIES:
        raise MoekitError(f"healing supports softmax top-k routers ({', '.join(HEAL_FAMILIES)}), not '{layer.family.name}'")
    w = layer.expert_weights()
    t = LayerTensors(layer.router_weight.detach().float().clone(), w["gate"].float(), w["up"].float(), w["down"].float(),
                     layer.top_k, layer.norm_topk_prob, layer.act_fn)
    sh = layer.shared_expert
    if sh is not None:
        t.s_gate, t.s_up = sh.gate_proj.weight.detach().float().clone(), sh.up_proj.weight.detach().float().clone()
        t.s_down, t.s_act = sh.down_proj.weight.detach().float().clone(), sh.act_fn
        if layer.shared_gate is not None:
            t.s_sigmoid = layer.shared_gate.weight.detach().float().clone()
    return t


@torch.no_grad()
def write_layer(layer: arch.MoELayer, t: LayerTensors) -> None:
    layer.replace_experts(t.gate.detach(), t.up.detach(), t.down.detach(), router_weight=t.router.detach())
    sh = layer.shared_expert
    if sh is not None and t.s_gate is not None:
        for mod, val in ((sh.gate_proj, t.s_gate), (sh.up_proj, t.s_up), (sh.down_proj, t.s_down)):
            mod.weight.copy_(val.detach())
        if t.s_sigmoid is not None:
            layer.shared_gate.weight.copy_(t.s_sigmoid.detach())


def routing(t: LayerTensors, x: torch.Tensor) -> torch.Tensor:
    """Dense routing-weight matrix [T,E]: softmax over all experts, top-k kept, optionally renormalised."""
    probs = torch.softmax(x @ t.router.T, dim=-1)
    top_v, top_i = probs.topk(t.top_k, dim=-1)
    if t.norm_topk:
        top_v = top_v / top_v.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, top_i, top_v)


def expert_hidden(t: LayerTensors, x: torch.Tensor) -> torch.Tensor:
    """Every routed expert's intermediate activation [T, E, I]."""
    e, i, h = t.gate.shape
    g = x @ t.gate.reshape(e * i, h).T
    u = x @ t.up.reshape(e * i, h).T
    return (t.act(g) * u).view(-1, e, i)


def shared_hidden(t: LayerTensors, x: torch.Tensor) -> torch.Tensor | None:
    """Shared-expert activation with its sigmoid gate folded in [T, Is] (None without a shared expert)."""
    if t.s_gate is None:
        return None
    hs = t.s_act(x @ t.s_gate.T) * (x @ t.s_up.T)
    if t.s_sigmoid is not None:
        hs = hs * torch.sigmoid(x @ t.s_sigmoid.T)
    return hs


def flat_down(t: LayerTensors) -> torch.Tensor:
    """Routed down projections as one matrix [H, E*I]."""
    e, h, i = t.down.shape
    return t.down.permute(1, 0, 2).reshape(h, e * i)


def moe_ffn(t: LayerTensors, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE FFN on x [T,H]: every expert computed, unselected ones weighted 0 (same maths as the module)."""
    w = routing(t, x) if weights is None else weights
    hw = (expert_hidden(t, x) * w[:, :, None]).flatten(1)
    out = hw @ flat_down(t).T
    hs = shared_hidden(t, x)
    if hs is not None:
        out = out + hs @ t.s_down.T
    return out


def relative_error(t: LayerTensors, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            num += (moe_ffn(t, x[s : s + chunk]) - y[s : s + chunk]).pow(2).sum().item()
            den += y[s : s + chunk].pow(2).sum().item()
    return num / max(den, 1e-30)


# ----------------------------------------------------------------------------- healing steps
@torch.no_grad()
def fit_router(t: LayerTensors, x: torch.Tensor, ridge: float = 1e-2, spread: float | None = None,
               target: str = "log_energy", chunk: int = 1024) -> None:
    """Ridge-fit the router (in place) to each token's per-expert output energy ``||down_e h_e(x)||^2``.

    ``target``: ``log_energy`` (its logarithm) or ``topk`` (1 for the k most energetic experts, else 0);
    either is centred per token, since softmax ignores a per-token shift.
    """
    if target not in ("log_energy", "topk"):
        raise MoekitError(f"router target '{target}' is not one of log_energy, topk")
    targets = []
    for s in range(0, x.shape[0], chunk):
        h = expert_hidden(t, x[s : s + chunk])  # [t,E,I]
        energy = torch.einsum("tei,ehi->teh", h, t.down).pow(2).sum(-1)  # [t,E]
        if target == "log_energy":
            z = torch.log(energy + 1e-12)
        else:
            z = torch.zeros_like(energy).scatter(1, energy.topk(t.top_k, dim=1).indices, 1.0)
        targets.append(z - z.mean(1, keepdim=True))
    z = torch.cat(targets)
    xtx = x.T @ x
    lam = ridge * xtx.diagonal().mean()
    w = torch.linalg.solve(xtx + lam * torch.eye(xtx.shape[0]), x.T @ z).T  # [E,H]
    if spread is not None:
        w = w * (spread / max(float((x @ w.T).std()), 1e-12))
    t.router = w.contiguous()


def _down_grams(t: LayerTensors, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048):
    """Gram of the (weighted) activations feeding the down projections, their cross term with y, and ||y||^2."""
    gram = rhs = None
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk]
        z = (expert_hidden(t, xs) * routing(t, xs)[:, :, None]).flatten(1)
        hs = shared_hidden(t, xs)
        if hs is not None:
            z = torch.cat([hs, z], dim=1)
        z = z.double()
        g, r = z.T @ z, z.T @ y[s : s + chunk].double()
        gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
    return gram, rhs, float(y.double().pow(2).sum())


def _current_down(t: LayerTensors) -> torch.Tensor:
    """All down projections as one matrix [H, Is + E*I] (shared first)."""
    d = flat_down(t)
    return d if t.s_down is None else torch.cat([t.s_down, d], dim=1)


def _solve_down(gram, rhs, prior, lam):
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    scale = gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + lam * scale * eye, rhs + lam * scale * prior.T).T  # [H, F]


@torch.no_grad()
def fit_down(t: LayerTensors, x: torch.Tensor, y: torch.Tensor, ridge: float | None = None,
             grid: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), holdout: float = 0.2) -> float:
    """Least-squares refit of all down projections (routed and shared) for the current routing (in place).

    Ridge toward the current weights (a compensation, not a fresh fit): with few calibration tokens an
    unregularised fit memorises them. ``ridge=None`` picks the strength from ``grid`` on the last
    ``holdout`` share of the tokens, then refits on all of them. Returns the strength used.
    """
    prior = _current_down(t).double()
    if ridge is None:
        cut = int(x.shape[0] * (1 - holdout))
        g_t, r_t, _ = _down_grams(t, x[:cut], y[:cut])
        g_v, r_v, yy_v = _down_grams(t, x[cut:], y[cut:])
        best = None
        for lam in grid:
            d = _solve_down(g_t, r_t, prior, lam)
            err = float(((d @ g_v) * d).sum() - 2 * (d * r_v.T).sum() + yy_v)
            if best is None or err < best[0]:
                best = (err, lam)
        ridge = best[1]
        gram, rhs = g_t + g_v, r_t + r_v
    else:
        gram, rhs, _ = _down_grams(t, x, y)
    d = _solve_down(gram, rhs, prior, ridge).float()
    e, h, i = t.down.shape
    if t.s_down is not None:
        n_s = t.s_down.shape[1]
        t.s_down, d = d[:, :n_s].contiguous(), d[:, n_s:]
    t.down = d.reshape(h, e, i).permute(1, 0, 2).contiguous()
    return ridge


def fit_local(t: LayerTensors, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int,
              seed: int = 0, holdout: float = 0.1) -> list[float]:
    """Adam on the layer's experts, shared expert and router toward y (in place), cosine-decayed lr.

    The last ``holdout`` share of the tokens is kept out of training; the weights after the epoch with the
    lowest held-out error are kept (the starting point counts as epoch 0). Returns held-out errors.
    """
    names = [n for n in ("router", "gate", "up", "down", "s_gate", "s_up", "s_down", "s_sigmoid") if getattr(t, n) is not None]
    cut = int(x.shape[0] * (1 - holdout)) if holdout > 0 else x.shape[0]
    (x_t, y_t), (x_v, y_v) = (x[:cut], y[:cut]), ((x[cut:], y[cut:]) if holdout > 0 else (x, y))
    errors = [relative_error(t, x_v, y_v)]
    best = {n: getattr(t, n) for n in names}
    params = [getattr(t, n).detach().clone().requires_grad_(True) for n in names]
    for n, p in zip(names, params, strict=True):
        setattr(t, n, p)
    opt = torch.optim.Adam(params, lr=lr)
    n = x_t.shape[0]
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    scale = y_t.pow(2).mean()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        with torch.enable_grad():
            for s in range(0, n, batch):
                idx = perm[s : s + batch]
                loss = (moe_ffn(t, x_t[idx]) - y_t[idx]).pow(2).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        errors.append(relative_error(t, x_v, y_v))
        if errors[-1] <= min(errors[:-1]):
            best = {n_: p.detach().clone() for n_, p in zip(names, params, strict=True)}
    for n_ in names:
        setattr(t, n_, best[n_].detach())
    return errors


# ----------------------------------------------------------------------------- the layer walk
@torch.no_grad()
def _first_layer_inputs(model, tokens: torch.Tensor, batch_size: int):
    """Hidden states entering decoder layer 0 and the keyword arguments the model passes, per batch."""
    first = arch.decoder_layers(model)[0]
    device = next(model.parameters()).device
    states, kwargs = [], []
    for b in range(0, tokens.shape[0], batch_size):
        args, kw = inputs_of(model, first, tokens[b : b + batch_size].to(device), use_cache=False)
        kw = dict(kw)
        states.append(args[0] if args else kw.pop("hidden_states"))
        kw.pop("hidden_states", None)
        kwargs.append(kw)
    return states, kwargs


def _layer_output(layer_out):
    return layer_out[0] if isinstance(layer_out, tuple) else layer_out


@register("heal", HealConfig, needs=("tokens", "teacher"))
def heal_(moe, cfg: HealConfig | None = None, *, tokens: torch.Tensor | None = None, teacher=None, stats=None,
          progress: bool = True) -> dict:
    """Heal ``moe`` in place toward ``teacher`` (same depth and width) on calibration ``tokens`` [n, L].

    Returns the report: per healed layer the relative FFN error before and after each stage
    (``{"layers": {i: {"before", "router", "lstsq", "local", ...}}}``), and the last distillation /
    fine-tuning loss when those stages ran.
    """
    if tokens is None or teacher is None:
        raise MoekitError("healing needs tokens=[n, L] calibration ids and teacher=(the dense model it learns from)")
    cfg = cfg or HealConfig()
    cfg.validate()
    layers = arch.require_moe(moe)
    for layer in layers:
        if layer.family.name not in HEAL_FAMILIES:
            raise MoekitError(f"healing supports softmax top-k routers ({', '.join(HEAL_FAMILIES)}), not '{layer.family.name}'")
    t_layers = arch.decoder_layers(teacher)
    s_layers = arch.decoder_layers(moe)
    if len(t_layers) != len(s_layers) or teacher.config.hidden_size != moe.config.hidden_size:
        raise MoekitError("the teacher must have the same number of layers and hidden size as the MoE being healed")
    by_index = {layer.index: layer for layer in layers}
    wanted = set(by_index) if cfg.layers is None else set(cfg.layers) & set(by_index)
    report: dict = {"layers": {}}
    if cfg.router or cfg.lstsq or cfg.local_epochs > 0:
        states, kwargs = _first_layer_inputs(moe, tokens, cfg.batch_size)
        last = max(wanted) if wanted else -1
        for i in tqdm(range(last + 1), desc="heal: layers", disable=not progress, leave=False):
            states = _heal_layer(s_layers[i], t_layers[i], by_index.get(i) if i in wanted else None, states, kwargs,
                                 cfg, report["layers"])
    if cfg.distill_steps > 0:
        report["distill_kl"] = _distill_stage(moe, teacher, tokens, cfg, progress=progress)
    if cfg.finetune != "none" and cfg.finetune_steps > 0:
        report["finetune_loss"] = _finetune_stage(moe, tokens, cfg, progress=progress)
    moe.eval()
    return report


@torch.no_grad()
def _heal_layer(s_layer, t_layer, view, states, kwargs, cfg: HealConfig, report: dict):
    """Run one decoder layer on ``states``; if ``view`` is an MoE layer to heal, heal it first."""
    if view is None:
        return [_layer_output(s_layer(h, **kw)) for h, kw in zip(states, kwargs, strict=True)]
    captured = []
    with Hooks() as hooks:
        hooks.forward(s_layer.mlp, lambda m, a, o: captured.append((a[0], _layer_output(o))))
        outs = [_layer_output(s_layer(h, **kw)) for h, kw in zip(states, kwargs, strict=True)]
    shapes = [c[0].shape for c in captured]
    mids = [o - c[1] for o, c in zip(outs, captured, strict=True)]  # residual stream before the FFN (pre-norm layers)
    x = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in captured]).float()
    y = torch.cat([_layer_output(t_layer.mlp(c[0].to(next(t_layer.parameters()).dtype))).reshape(-1, x.shape[1])
                   for c in captured]).float()
    device = x.device
    x, y = x.cpu(), y.cpu()
    t = read_layer(view)
    rec = {"before": relative_error(t, x, y)}
    if cfg.router:
        fit_router(t, x, cfg.router_ridge, cfg.router_spread, cfg.router_target)
        rec["router"] = relative_error(t, x, y)
    if cfg.lstsq:
        rec["lstsq_ridge"] = fit_down(t, x, y, cfg.lstsq_ridge)
        rec["lstsq"] = relative_error(t, x, y)
    if cfg.local_epochs > 0:
        rec["local_holdout"] = fit_local(t, x, y, cfg.local_epochs, cfg.local_lr, cfg.local_batch, cfg.seed + view.index)
        rec["local"] = relative_error(t, x, y)
    write_layer(view, t)
    report[view.index] = rec
    new = []
    for mid, (xin, _), shape in zip(mids, captured, shapes, strict=True):
        new.append(mid + _layer_output(view.block(xin)).reshape(shape[:-1] + (mid.shape[-1],)).to(device))
    return new


# ----------------------------------------------------------------------------- end to end (optional)
def _batches(tokens: torch.Tensor, batch_size: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=gen)]


def _distill_stage(moe, teacher, tokens: torch.Tensor, cfg: HealConfig, *, progress: bool = True) -> float:
    """Forward-KL distillation of the experts, shared experts and routers (the ``.mlp.`` parameters) from the
    teacher's logits, through moekit's one distillation loop (:func:`moekit.train.distill.distill_`)."""
    from moekit.train.distill import DistillConfig, distill_

    trainable = [p for n, p in moe.named_parameters() if ".mlp." in n]
    for p in moe.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    dcfg = DistillConfig(steps=cfg.distill_steps, lr=cfg.distill_lr, batch_size=cfg.batch_size, seq_len=tokens.shape[1],
                         warmup_steps=0, grad_clip=0.0, seed=cfg.seed, progress=progress)
    result = distill_(moe, dcfg, tokens=tokens, teacher=teacher)
    for p in trainable:
        p.requires_grad_(False)
    return result["losses"][-1]


class LoadBalancer:
    """CMoE's load-balancing bias: added to router scores for selection only, nudged by gamma toward equal load.

    Installed on each router while fine-tuning; removed afterwards (a standard router has no selection bias).
    """

    def __init__(self, layers: list[arch.MoELayer], gamma: float):
        self.layers, self.gamma = layers, gamma
        self.bias = {layer.index: torch.zeros(layer.num_experts) for layer in layers}
        self.load = {layer.index: torch.zeros(layer.num_experts) for layer in layers}
        self._saved = {}

    def _forward(self, layer: arch.MoELayer):
        router = layer.router

        def forward(hidden_states):
            x = hidden_states.reshape(-1, router.weight.shape[1])
            logits = nn.functional.linear(x, router.weight)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            bias = self.bias[layer.index].to(probs.device)
            idx = (probs + bias).topk(router.top_k, dim=-1).indices
            val = probs.gather(1, idx)
            if layer.norm_topk_prob:
                val = val / val.sum(-1, keepdim=True)
            with torch.no_grad():
                self.load[layer.index] += torch.bincount(idx.flatten().cpu(), minlength=self.load[layer.index].numel()).float()
            return logits, val.to(logits.dtype), idx

        return forward

    def __enter__(self):
        for layer in self.layers:
            self._saved[layer.index] = layer.router.forward
            layer.router.forward = self._forward(layer)
        return self

    def step(self) -> None:
        """After an optimiser step: bias += gamma * sign(mean load - load)."""
        for i, load in self.load.items():
            self.bias[i] += self.gamma * torch.sign(load.mean() - load)
            load.zero_()

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.router.forward = self._saved[layer.index]
        return False


def lora_config(moe, cfg: HealConfig):
    """LoRA on attention, the shared experts' and dense layers' linears, and the routed experts.

    transformers 5 stores a layer's routed experts as 3-D parameters (``experts.gate_up_proj`` [E, ...]),
    which ``target_modules`` cannot reach; peft >= 0.17 adapts them through ``target_parameters``.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise MoekitError("LoRA fine-tuning needs peft >= 0.17: pip install 'moekit[lora]'") from None
    expert_params = sorted({n.split(".mlp.", 1)[1] for n, p in moe.named_parameters() if ".mlp.experts." in n and p.dim() == 3})
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      target_parameters=[f"mlp.{n}" for n in expert_params] or None)


def get_peft_model(moe, lora):
    from peft import get_peft_model as wrap

    return wrap(moe, lora)


def _finetune_stage(moe, tokens: torch.Tensor, cfg: HealConfig, *, progress: bool = True) -> float:
    """LoRA (merged back afterwards) or router-only fine-tuning on next-token loss, with the balancing bias."""
    device = next(moe.parameters()).device
    layers = arch.require_moe(moe)
    for p in moe.parameters():
        p.requires_grad_(False)
    # the balancer reads each layer's expert count now: LoRA on routed experts wraps the experts modules
    with LoadBalancer(layers, cfg.balance_gamma) as balancer:
        model = moe
        if cfg.finetune == "lora":
            model = get_peft_model(moe, lora_config(moe, cfg))
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = [layer.router.weight for layer in layers]
            for p in params:
                p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=0.0)
        model.train()
        last = float("nan")
        for batch in tqdm(_batches(tokens, cfg.batch_size, cfg.finetune_steps, cfg.seed), total=cfg.finetune_steps,
                          desc=f"heal: finetune ({cfg.finetune})", disable=not progress, leave=False):
            batch = batch.to(device)
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            balancer.step()
            last = loss.item()
    if cfg.finetune == "lora":
        moe = model.merge_and_unload()
    for p in moe.parameters():
        p.requires_grad_(False)
    moe.eval()
    return last
