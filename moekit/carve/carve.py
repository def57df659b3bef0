"""CMoE: carve a dense model's FFNs into a Mixture-of-Experts (Pei et al., arXiv 2502.04416).

For each FFN with ``d_h`` neurons, N experts of ``m = d_h / N`` neurons (N_s shared, N_r = N - N_s routed,
N_k routed active per token):

1. on calibration tokens, ``h = act(x W_gate^T) * (x W_up^T)``; each token marks its top-``K_a`` neurons by
   ``|h|``; a neuron's activation rate ``mu_i`` is the share of tokens that mark it;
2. shared experts: the ``N_s * m`` neurons of highest ``mu``;
3. routed experts: balanced clustering of the other neurons into N_r groups of exactly m, solved as a
   linear assignment (``scipy.optimize.linear_sum_assignment``) on the neurons' marker columns, L1
   distance, centroids seeded from the highest-rate neurons; one iteration as in the paper, or repeated
   until the assignment stops changing (``iterations=0``);
4. training-free router: each routed expert's representative neuron (closest to its centroid) scores it.

Mapping onto a standard architecture (so plain transformers loads it and vLLM serves it):

* Llama / Mistral / Qwen2 sources become **Qwen2-MoE** (its attention is Llama's with optional q/k/v
  biases, ``qkv_bias``); Qwen3 sources become **Qwen3-MoE** (no shared expert there, so ``shared=0``).
  Embeddings, norms, attention and the LM head are copied unchanged.
* Qwen2-MoE gates its shared expert with ``sigmoid(w x)``: the gate weight is set to zero (exactly 0.5) and
  the shared ``down_proj`` doubled, so the shared expert is exactly ungated.
* Routed weights are softmax top-k with ``norm_topk_prob=True`` and every routed ``down_proj`` multiplied
  by N_k: equal router probabilities then give each selected expert weight exactly 1, which is CMoE's
  gate at initialisation (g = 1 + s'u with u = 0). CMoE's router scores experts by the representative
  neuron's activation; a standard router is linear, so its row is the representative's *gate* row
  (the pre-activation), scaled so logits have a small spread (``router_spread``) and the selected
  experts' weights stay within about a percent of 1. With all experts active and a zero router the carved
  model equals the dense one (tests/test_carve.py states the tolerance).

``carve`` returns the carved model; :mod:`moekit.heal` then repairs what the sparsity breaks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.hooks import Hooks
from moekit.core.keys import CARVE_KEY as CONFIG_KEY  # the carving record kept in the carved model's config
from moekit.core.registry import register
from moekit.errors import MoekitError

CARVE_TARGETS = {"llama": "qwen2_moe", "mistral": "qwen2_moe", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


@dataclass
class CarveConfig:
    """How to carve: N experts (N_s shared), N_k routed experts active, K_a markers per token."""

    experts: int = 32  # N: experts per FFN, shared ones included; must divide the FFN width d_h
    shared: int = 4  # N_s: experts' worth of neurons always active (one shared expert of N_s * m neurons)
    active: int = 8  # N_k: routed experts per token (the MoE's top-k)
    k_a: int = 10  # K_a: neurons each token marks (top-|h|) for the activation rates and clustering
    iterations: int = 1  # balanced k-means rounds; 0 = until the assignment stops changing (max_iterations)
    max_iterations: int = 30
    router_spread: float = 0.01  # std of the router logits on calibration tokens (small: weights ~ 1)
    batch_size: int = 4  # calibration sequences per forward pass

    @property
    def routed(self) -> int:
        return self.experts - self.shared

    def validate(self) -> None:
        """The checks that need no model (:func:`check_config` adds the ones against the dense model)."""
        n, ns, nk = self.experts, self.shared, self.active
        if n < 2:
            raise MoekitError(f"--experts {n}: carve into at least 2 experts")
        if ns < 0 or ns >= n:
            raise MoekitError(f"--shared {ns} must be between 0 and experts - 1 = {n - 1}")
        if nk < 1 or nk > n - ns:
            raise MoekitError(f"--active {nk} must be between 1 and the {n - ns} routed experts (experts - shared)")
        if self.k_a < 1:
            raise MoekitError(f"K_a {self.k_a} must be at least 1")
        if self.iterations < 0:
            raise MoekitError(f"iterations {self.iterations} must be >= 0 (0 = until convergence)")
        if self.batch_size < 1:
            raise MoekitError(f"batch_size {self.batch_size} must be at least 1")


@dataclass
class Partition:
    """One FFN's carving: neuron indices of the shared expert, of each routed expert, and representatives."""

    shared: torch.Tensor  # [N_s * m]
    routed: torch.Tensor  # [N_r, m]
    representatives: torch.Tensor  # [N_r] neuron index per routed expert
    rates: torch.Tensor  # [d_h] activation rate mu
    iterations: int  # assignment rounds run


# ----------------------------------------------------------------------------- checks
def dense_mlps(model) -> list:
    """The FFN of every decoder layer; a clear error if the model is not a dense gated-FFN model."""
    mt = arch.model_type(model)
    if mt in arch.MOE_FAMILIES:
        raise MoekitError(f"'{mt}' is already an MoE: carve a dense model ({', '.join(arch.DENSE_FAMILIES)})")
    if mt not in CARVE_TARGETS:
        raise MoekitError(f"cannot carve '{mt}': moekit carves {', '.join(CARVE_TARGETS)} models with a gated FFN")
    mlps = [getattr(layer, "mlp", None) for layer in arch.decoder_layers(model)]
    for i, mlp in enumerate(mlps):
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise MoekitError(f"layer {i} has no gated FFN (gate_proj/up_proj/down_proj): CMoE carves gated FFNs only")
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise MoekitError(f"layer {i}'s FFN has biases (mlp_bias): carving FFNs with biases is not supported")
    return mlps


def check_config(model, cfg: CarveConfig) -> int:
    """Validate ``cfg`` against ``model``; return the expert size m."""
    cfg.validate()
    mlps = dense_mlps(model)
    d_h = int(mlps[0].gate_proj.weight.shape[0])
    n, ns = cfg.experts, cfg.shared
    if d_h % n:
        divisors = [d for d in range(2, min(d_h, 256) + 1) if d_h % d == 0]
        raise MoekitError(f"--experts {n} does not divide the FFN width {d_h}: choose one of {divisors}")
    if ns and CARVE_TARGETS[arch.model_type(model)] == "qwen3_moe":
        raise MoekitError("Qwen3 sources carve into Qwen3-MoE, which has no shared expert: pass --shared 0")
    if cfg.k_a > d_h:
        raise MoekitError(f"K_a {cfg.k_a} must be between 1 and the FFN width {d_h}")
    return d_h // n


# ----------------------------------------------------------------------------- statistics
@torch.no_grad()
def marker_stats(model, tokens: torch.Tensor, k_a: int, batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Per layer: each token's top-``k_a`` neurons by |h| (int16 [T, k_a]) and the gate pre-activation std [d_h]."""
    mlps = dense_mlps(model)
    out = [{"top": [], "g_sum": 0.0, "g_sq": 0.0, "count": 0} for _ in mlps]

    def hook(i):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            g = x @ module.gate_proj.weight.float().T
            h = module.act_fn(g) * (x @ module.up_proj.weight.float().T)
            rec = out[i]
            rec["top"].append(h.abs().topk(k_a, dim=1).indices.to(torch.int16))
            rec["g_sum"] = rec["g_sum"] + g.sum(0)
            rec["g_sq"] = rec["g_sq"] + (g * g).sum(0)
            rec["count"] += g.shape[0]
        return fn

    device = next(model.parameters()).device
    with Hooks() as hooks:
        for i, m in enumerate(mlps):
            hooks.pre(m, hook(i))
        for b in tqdm(range(0, tokens.shape[0], batch_size), desc="carve: activation markers", disable=not progress, leave=False):
            model(tokens[b : b + batch_size].to(device), use_cache=False)
    stats = []
    for rec in out:
        mean = rec["g_sum"] / rec["count"]
        std = (rec["g_sq"] / rec["count"] - mean * mean).clamp_min(0).sqrt()
        stats.append({"top": torch.cat(rec["top"]).long().cpu(), "gate_std": std.cpu()})
    return stats


def marker_matrix(top: torch.Tensor, d_h: int) -> torch.Tensor:
    """Binary marker matrix [T, d_h] from each token's marked neuron indices [T, k_a]."""
    a = torch.zeros(top.shape[0], d_h)
    a.scatter_(1, top, 1.0)
    return a


# ----------------------------------------------------------------------------- partition
def l1_to_centroids(markers: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """L1 distance between binary marker columns [T, n] and centroids in [0,1] [T, c] -> [n, c].

    For a in {0,1} and c in [0,1]: |a - c| = a + c - 2ac, so the sum over tokens is one matmul.
    """
    return markers.sum(0)[:, None] + centroids.sum(0)[None, :] - 2 * markers.T @ centroids


def balanced_assignment(cost: torch.Tensor, size: int) -> np.ndarray:
    """Assign n = c * size items to c clusters of exactly ``size`` by min total cost -> cluster id per item."""
    n, c = cost.shape
    slots = np.repeat(cost.double().numpy(), size, axis=1)  # column j -> cluster j // size
    rows, cols = linear_sum_assignment(slots)
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = cols // size
    return labels


def partition(markers: torch.Tensor, n_experts: int, n_shared: int, iterations: int = 1,
              max_iterations: int = 30) -> Partition:
    """CMoE partition of one FFN from its marker matrix [T, d_h] (see module doc)."""
    d_h = markers.shape[1]
    m = d_h // n_experts
    n_routed = n_experts - n_shared
    rates = markers.mean(0)
    # stable sort: ties broken by neuron index, so the partition is deterministic
    order = torch.sort(rates, descending=True, stable=True).indices
    shared = torch.sort(order[: n_shared * m]).values
    rest = order[n_shared * m :]  # remaining neurons, highest rate first
    a = markers[:, rest]
    centroids = a[:, :n_routed].clone()  # seeds: the n_routed highest-rate remaining neurons
    labels, rounds = None, 0
    limit = max_iterations if iterations == 0 else iterations
    while rounds < limit:
        rounds += 1
        new = balanced_assignment(l1_to_centroids(a, centroids), m)
        converged = labels is not None and np.array_equal(new, labels)
        labels = new
        lab = torch.from_numpy(labels)
        centroids = torch.stack([a[:, lab == j].mean(1) for j in range(n_routed)], dim=1)
        if converged:
            break
    lab = torch.from_numpy(labels)
    dist = l1_to_centroids(a, centroids)  # [n, c]
    routed, reps = [], []
    for j in range(n_routed):
        members = torch.nonzero(lab == j).flatten()
        reps.append(rest[members[dist[members, j].argmin()]])
        routed.append(torch.sort(rest[members]).values)
    return Partition(shared, torch.stack(routed), torch.stack(reps), rates, rounds)


# ----------------------------------------------------------------------------- building the MoE
def moe_config(dense_config, cfg: CarveConfig, m: int):
    """The standard MoE config that holds the carved model."""
    from transformers import AutoConfig

    src = dense_config
    target = CARVE_TARGETS[src.model_type]
    kw = dict(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers, num_attention_heads=src.num_attention_heads,
        num_key_value_heads=getattr(src, "num_key_value_heads", None) or src.num_attention_heads,
        hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings,
        initializer_range=src.initializer_range, rms_norm_eps=src.rms_norm_eps,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        rope_parameters=getattr(src, "rope_parameters", None), attention_dropout=getattr(src, "attention_dropout", 0.0),
        head_dim=getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads,
        decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=m, num_experts=cfg.routed,
        num_experts_per_tok=cfg.active, norm_topk_prob=True,
        pad_token_id=src.pad_token_id, bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
    )
    window = getattr(src, "sliding_window", None)
    if window and (getattr(src, "use_sliding_window", True)):
        kw.update(use_sliding_window=True, sliding_window=window,
                  max_window_layers=getattr(src, "max_window_layers", src.num_hidden_layers))
        if getattr(src, "layer_types", None) is not None and target == "qwen2_moe":
            kw["layer_types"] = list(src.layer_types)
    if target == "qwen2_moe":
        # always with q/k/v biases (zero when the source has none): vLLM's qwen2_moe builds them regardless and
        # leaves absent ones uninitialised (see moekit.checkpoint.forms)
        kw.update(shared_expert_intermediate_size=cfg.shared * m, qkv_bias=True)
    else:
        kw.update(attention_bias=bool(getattr(src, "attention_bias", False)))
    return AutoConfig.for_model(target, **kw)


_QKV_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")


def _copy_non_ffn(dense, moe) -> None:
    """Embeddings, norms, attention and LM head: copied unchanged; every non-FFN tensor must be found."""
    src = dense.state_dict()
    dst = moe.state_dict()
    for key, t in dst.items():
        if ".mlp." in key:
            continue
        if key not in src:
            if key == "lm_head.weight" and moe.config.tie_word_embeddings:
                continue
            if key.endswith(_QKV_BIASES) and moe.config.model_type == "qwen2_moe":
                t.zero_()  # a source without attention biases: zero ones compute the same
                continue
            raise MoekitError(f"cannot map '{key}' from the dense model: its attention differs from {moe.config.model_type}'s")
        if src[key].shape != t.shape:
            raise MoekitError(f"'{key}' has shape {tuple(src[key].shape)} in the dense model, {tuple(t.shape)} in the MoE")
        t.copy_(src[key])
    extra = [k for k in src if ".mlp." not in k and k not in dst]
    if extra:
        raise MoekitError(f"the dense model has tensors the MoE cannot hold (e.g. '{extra[0]}'): unsupported variant")


@torch.no_grad()
def write_layer(layer: arch.MoELayer, mlp, part: Partition, cfg: CarveConfig, gate_std: torch.Tensor) -> None:
    """Fill one MoE layer from the dense FFN ``mlp`` and its partition."""
    wg, wu, wd = (getattr(mlp, n).weight.detach().float().cpu() for n in ("gate_proj", "up_proj", "down_proj"))
    idx = part.routed  # [N_r, m]
    gate, up = wg[idx], wu[idx]  # [N_r, m, H]
    down = wd[:, idx].permute(1, 0, 2) * cfg.active  # [N_r, H, m]; x N_k undoes the renormalised 1/N_k
    rep = part.representatives
    scale = cfg.router_spread / max(float(gate_std[rep].mean()), 1e-12)
    router = wg[rep] * scale
    layer.replace_experts(gate, up, down, router_weight=router)
    sh = layer.shared_expert
    if sh is not None:
        s = part.shared
        sh.gate_proj.weight.copy_(wg[s])
        sh.up_proj.weight.copy_(wu[s])
        sh.down_proj.weight.copy_(wd[:, s] * 2.0)  # sigmoid(0) = 0.5 gate -> x2 makes it exactly ungated
        layer.shared_gate.weight.zero_()


@register("carve", CarveConfig, needs=("tokens",), new_model=True)
@torch.no_grad()
def carve(dense_model, cfg: CarveConfig | None = None, *, tokens: torch.Tensor | None = None, stats=None, teacher=None,
          progress: bool = True):
    """Carve ``dense_model`` into an MoE on calibration ``tokens`` [n_seq, seq_len]; returns the new model.

    The dense model is left unchanged. The result is a transformers Qwen2-MoE / Qwen3-MoE in fp32 on the
    dense model's device, with the carving record (config, time, assignment rounds) in its config.
    """
    from transformers import AutoModelForCausalLM

    cfg = cfg or CarveConfig()
    m = check_config(dense_model, cfg)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() < cfg.k_a:
        raise MoekitError("calibration tokens must be a [n_seq, seq_len] tensor with at least a few tokens")
    start, cpu_start = time.perf_counter(), time.process_time()
    mlps = dense_mlps(dense_model)
    d_h = int(mlps[0].gate_proj.weight.shape[0])
    stats = marker_stats(dense_model, tokens, cfg.k_a, cfg.batch_size, progress=progress)
    config = moe_config(dense_model.config, cfg, m)
    moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _copy_non_ffn(dense_model, moe)
    layers = arch.moe_layers(moe)
    rounds = []
    for layer, mlp, st in tqdm(list(zip(layers, mlps, stats, strict=True)), desc="carve: partition", disable=not progress, leave=False):
        part = partition(marker_matrix(st["top"], d_h), cfg.experts, cfg.shared, cfg.iterations, cfg.max_iterations)
        rounds.append(part.iterations)
        write_layer(layer, mlp, part, cfg, st["gate_std"])
    if config.tie_word_embeddings:
        moe.tie_weights()
    setattr(moe.config, CONFIG_KEY, {**asdict(cfg), "source": dense_model.config.model_type, "expert_size": m,
                                     "calibration_tokens": int(tokens.numel()), "rounds": rounds,
                                     "seconds": round(time.perf_counter() - start, 2),
                                     "cpu_seconds": round(time.process_time() - cpu_start, 2)})
    moe.generation_config = dense_model.generation_config
    return moe.to(next(dense_model.parameters()).device).eval()
