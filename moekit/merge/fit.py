"""Fitting a merged MoE block to the original one: calibration inputs, held-back split, coefficient learning.

The merged block is a function of its merge coefficients (and router rows): ``MoELayer.block_forward`` runs
the block's own forward with the merged weights standing in for its parameters (``torch.func``), so the
gradient reaches the coefficients without re-implementing the model. The objective is the relative squared
error of the block output, sum ||f(x) - f'(x)||^2 / sum ||f(x)||^2, in fp32.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.errors import MoekitError
from moekit.merge.rules import Cluster, assemble


# ---------------------------------------------------------------------------------------------- calibration
@torch.no_grad()
def capture_inputs(model, layers: list[arch.MoELayer], tokens: torch.Tensor, batch_size: int = 4) -> dict[int, torch.Tensor]:
    """Hidden states entering each MoE block on ``tokens`` [n_seq, seq_len] -> {layer: [n_seq, seq_len, H] fp32}."""
    device = next(model.parameters()).device
    store: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    with Hooks() as hooks:
        for layer in layers:
            def hook(_module, args, idx=layer.index):
                store[idx].append(args[0].detach().float().cpu())
            hooks.pre(layer.block, hook)
        for i in tqdm(range(0, len(tokens), batch_size), desc="capture MoE inputs", leave=False):
            model(tokens[i:i + batch_size].to(device))
    return {k: torch.cat(v) for k, v in store.items()}


def split_holdout(n_seq: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n_seq < 2:
        raise MoekitError("coefficient learning needs at least 2 calibration sequences (one held back): raise --n-seq")
    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed))
    n_val = min(n_seq - 1, max(1, round(holdout * n_seq)))
    return order[n_val:], order[:n_val]


# ---------------------------------------------------------------------------------------------- fitting
class BlockFit:
    """The merged block as a function of its merge coefficients (and router rows), against the original output.

    With ``fixed_routing`` (router rows not learned) the routing is computed once with the router in place, and
    only the (token, slot) pairs that pick a multi-member cluster are recomputed per step (the experts module's
    own forward, one pair per row); everything else (shared expert, unmerged experts) is a constant.
    """

    def __init__(self, layer: arch.MoELayer, clusters: list[Cluster], x: torch.Tensor, y: torch.Tensor,
                 fixed_routing: bool = False):
        self.layer, self.clusters, self.x, self.y = layer, clusters, x, y
        self.norm = y.pow(2).sum().clamp_min(1e-30)
        self.fixed = fixed_routing
        if fixed_routing:  # one (token, slot) pair per row, top-1: no skip slots needed
            multi = torch.tensor([i for i, c in enumerate(clusters) if len(c.members) > 1], dtype=torch.long,
                                 device=x.device)
            with torch.no_grad():
                _, weights, idx = layer.route(x)
                tok, slot = torch.nonzero(torch.isin(idx, multi), as_tuple=True)
                self.pair_tok, self.pair_x = tok, x[tok]
                self.pair_idx, self.pair_w = idx[tok, slot][:, None], weights[tok, slot][:, None]
                full = layer.block_forward(x[None])[0]
                self.const = full.index_add(0, tok, -layer.combine(self.pair_x, self.pair_w, self.pair_idx))

    def output(self, alphas, router_w, router_b, x=None) -> torch.Tensor:
        w, b = assemble(self.clusters, alphas)
        params = self.layer.block_tensors(w.get("gate"), w["up"], w["down"], router_w, router_b, b)
        if self.fixed and x is None:
            part = self.layer.combine(self.pair_x, self.pair_w, self.pair_idx, params)
            return self.const.index_add(0, self.pair_tok, part)
        x = self.x if x is None else x
        return self.layer.block_forward(x.reshape(1, -1, x.shape[-1]), params).reshape(x.shape)

    def error(self, alphas, router_w, router_b) -> torch.Tensor:
        """Relative squared error sum ||f(x) - f'(x)||^2 / sum ||f(x)||^2."""
        return (self.output(alphas, router_w, router_b) - self.y).pow(2).sum() / self.norm


def fit_coefficients(train: BlockFit, val: BlockFit, router_w, router_b, cfg) -> dict:
    """Fit the merge coefficients of multi-member clusters (and their router rows with ``learn_router``).
    Monotone training loss (a step that would raise it is undone and the step size halved), early stopping
    on held-back tokens, and the initialisation returned unless the held-back error improves."""
    torch.manual_seed(cfg.seed)
    alphas = [c.alpha0.clone().requires_grad_(len(c.members) > 1) for c in train.clusters]
    multi = [i for i, c in enumerate(train.clusters) if len(c.members) > 1]
    params = [alphas[i] for i in multi]
    rw = router_w.clone()
    delta = torch.zeros(len(multi), rw.shape[1], requires_grad=True)
    if cfg.learn_router:
        params.append(delta)

    def current_router():
        if not cfg.learn_router or not multi:
            return rw
        return rw.index_add(0, torch.tensor(multi, device=rw.device), delta)

    def train_loss():
        for p in params:
            p.grad = None
        loss = train.error(alphas, current_router(), router_b)
        loss.backward()
        return loss.item()

    def val_loss():
        with torch.no_grad():
            return float(val.error(alphas, current_router(), router_b))

    report = {"train": [], "holdout": [], "rejected_steps": 0, "steps": 0}
    if not params:
        v = val_loss()
        report.update(train=[float(train.error(alphas, rw, router_b).detach())], holdout=[v], init=v, best=v)
        return {"alphas": [a.detach() for a in alphas], "router_weight": rw, **report}
    opt = torch.optim.Adam(params, lr=cfg.lr)
    lr = cfg.lr
    cur = train_loss()
    init_val = val_loss()
    report["train"].append(cur)
    report["holdout"].append(init_val)
    best_val, best = init_val, [p.detach().clone() for p in params]
    stale = 0
    for _ in range(cfg.steps):
        saved = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()),
                 [p.grad.clone() for p in params])
        opt.step()
        new = train_loss()
        report["steps"] += 1
        if not new <= cur:  # also catches NaN: undo, halve the step size
            with torch.no_grad():
                for p, s, g in zip(params, saved[0], saved[2], strict=True):
                    p.copy_(s)
                    p.grad = g
            opt.load_state_dict(saved[1])
            lr /= 2
            for group in opt.param_groups:
                group["lr"] = lr
            report["rejected_steps"] += 1
            if lr < cfg.lr / 64:
                break
            continue
        cur = new
        v = val_loss()
        report["train"].append(cur)
        report["holdout"].append(v)
        if v < best_val:
            best_val, best, stale = v, [p.detach().clone() for p in params], 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    with torch.no_grad():
        for p, s in zip(params, best, strict=True):
            p.copy_(s)
    report.update(init=init_val, best=best_val)
    return {"alphas": [a.detach() for a in alphas], "router_weight": current_router().detach(), **report}
