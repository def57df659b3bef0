"""The statistics file: what the profiler measured, kept so that no later step has to recalibrate.

One safetensors file; tensors are named ``STAT.LAYER`` (LAYER is the decoder-layer index of an MoE
layer) or ``STAT`` for whole-model statistics; the JSON metadata says which model (fingerprint), which
data, how many tokens, which moekit version and which statistics were collected.

Per-expert statistics (E = experts in that layer, K = top-k, H = hidden size), all sums over the
calibration tokens so that files can be merged by adding:

==================  ========  ================================================================
name                shape     meaning
==================  ========  ================================================================
rank_counts         [E, K]    times expert e was selected at rank r (r = 0 is the top choice)
prob_mass           [E]       sum over all tokens of the router probability of e
selected_prob       [E]       sum of the router probability of e over the tokens that selected e
weight_sum          [E]       sum of the routing weight w_e the model applies, over the tokens routed to e
reap_sum            [E]       sum of g_e * ||E_e(x)||_2 over routed tokens, g_e = w_e / sum of the token's top-k
                              weights (the top-k-renormalised gate; REAP saliency numerator)
norm_sum            [E]       sum of ||E_e(x)||_2 over routed tokens (EAN numerator)
sq_norm_sum         [E]       sum of ||E_e(x)||_2^2 over routed tokens
weighted_out        [E, H]    h_e = sum of w_e * E_e(x) over routed tokens
down_max            [E]       max |down_proj output| over routed tokens (super-expert statistic)
shared_down_max     [S]       same for the layer's shared expert(s) (before its gate), when the layer has them
gram                [E, E]    optional: sum over a token sample of <E_i(x), E_j(x)> (every expert run on
                              the sample; meta ``gram_tokens`` says how many tokens)
hidden_max          [L]       whole model: max |hidden state| after each decoder layer
attn_sink           [L, A]    whole model, optional: MEAN attention probability each head puts on the first
                              token (queries 1..T-1; a mean, not a sum)
==================  ========  ================================================================

Metadata: ``fingerprint``, ``layers`` (MoE decoder-layer indices), ``num_layers``, ``tokens``, ``top_k``
(max over layers; ``top_k_per_layer`` and ``num_experts_per_layer`` per layer), ``model_type``, ``data``,
``gram_tokens``, ``collected``, ``moekit_version``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.version import __version__
from moekit.core.arch import moe_layers
from moekit.errors import MoekitError


@dataclass
class ExpertStats:
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------- access
    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.meta.get("layers", [])]

    @property
    def collected(self) -> list[str]:
        return list(self.meta.get("collected", []))

    @property
    def tokens(self) -> int:
        return int(self.meta.get("tokens", 0))

    def get(self, name: str, layer: int | None = None) -> torch.Tensor:
        key = name if layer is None else f"{name}.{layer}"
        if key not in self.tensors:
            if name not in self.collected:
                raise MoekitError(f"the statistics file has no '{name}'; re-run `moekit profile` with it collected")
            raise MoekitError(f"the statistics file has no '{name}' for layer {layer}; was it made for another model?")
        return self.tensors[key]

    def has(self, name: str) -> bool:
        return name in self.collected

    def require(self, *names: str, what: str = "this step") -> None:
        missing = [n for n in names if n not in self.collected]
        if missing:
            raise MoekitError(f"{what} needs {', '.join(missing)}, which the statistics file lacks; re-run `moekit profile` collecting it")

    def check_model(self, model) -> None:
        """Refuse a statistics file made for another model."""
        from moekit.profile.stats import fingerprint

        fp = fingerprint(model)
        if self.meta.get("fingerprint") != fp:
            raise MoekitError(
                f"the statistics file was made for another model (fingerprint {self.meta.get('fingerprint')} != {fp}); "
                "profile this model first"
            )

    def set(self, name: str, value: torch.Tensor, layer: int | None = None) -> None:
        key = name if layer is None else f"{name}.{layer}"
        self.tensors[key] = value.detach().cpu().contiguous()
        if name not in self.meta.setdefault("collected", []):
            self.meta["collected"].append(name)

    # ------------------------------------------------------------- files
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write atomically (:func:`moekit.outputs.save_tensors`); an existing file only with ``overwrite``."""
        from moekit.outputs import save_tensors

        meta = dict(self.meta, moekit_version=__version__)
        return save_tensors(self.tensors, path, {"moekit": json.dumps(meta)}, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> ExpertStats:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise MoekitError(f"statistics file '{path}' does not exist: run `moekit profile MODEL --out {path}` first")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("moekit", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except Exception:  # noqa: BLE001 (safetensors raises its own error types for a foreign file)
            raise MoekitError(f"'{path}' is not a moekit statistics file (safetensors with moekit metadata)") from None
        if not isinstance(meta, dict):
            raise MoekitError(f"'{path}' is not a moekit statistics file (no moekit metadata)")
        check_shapes(path, meta, tensors)
        return cls(meta=meta, tensors=tensors)


def check_shapes(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every per-layer, per-expert tensor (``NAME.LAYER``; ``shared_*`` are per shared expert) has one row per
    expert of its layer, as the file's own metadata counts them: a tampered or damaged file is refused here,
    not met later as a shape error in the middle of a computation."""
    experts = meta.get("num_experts_per_layer") or {}
    for key, tensor in tensors.items():
        name, _, layer = key.rpartition(".")
        if not layer.isdigit() or name.startswith("shared_") or layer not in experts:
            continue
        if tensor.dim() == 0 or tensor.shape[0] != int(experts[layer]):
            raise MoekitError(f"'{path}': '{key}' has shape {list(tensor.shape)}, but layer {layer} has {experts[layer]} "
                              "experts: the file is damaged or was edited; profile the model again")


def massive_layers(stats: ExpertStats, *, ratio: float = 10.0, jump: float = 2.0) -> list[int]:
    """MoE layers where massive activations form: the hidden-state max after the layer is at least ``jump`` x the
    max after the previous layer and at least ``ratio`` x the median over the layers before it (layer 0: over all
    layers). Massive activations usually persist once formed, so later layers are compared with what came before,
    not with the overall median."""
    hm = stats.get("hidden_max").float()
    out = []
    for layer in stats.layers:
        if layer == 0:
            formed = hm[0] >= ratio * hm.median().clamp_min(1e-6)
        else:
            base = hm[:layer].median().clamp_min(1e-6)
            formed = hm[layer] >= jump * hm[layer - 1] and hm[layer] >= ratio * base
        if formed:
            out.append(layer)
    return out


def super_expert_threshold(stats: ExpertStats, *, percentile: float = 99.5, max_ratio: float = 10.0) -> float | None:
    """max(P_percentile of all a_{l,e}, max(a) / max_ratio), a = ``down_max`` over every MoE layer; None if empty."""
    stats.require("down_max", what="super-expert detection")
    a_all = torch.cat([stats.get("down_max", layer).float().flatten() for layer in stats.layers])
    if a_all.numel() == 0:
        return None
    return max(torch.quantile(a_all, percentile / 100).item(), a_all.max().item() / max_ratio)


def super_experts(stats: ExpertStats, *, rule: str = "paper", percentile: float = 99.5, max_ratio: float = 10.0) -> list[tuple[int, int]]:
    """Super experts as (decoder layer, expert) pairs.

    ``paper`` (arXiv 2507.23279): a_{l,e} > P99.5 of all a and a_{l,e} > max(a)/10, counted in the layers
    where massive activations form (:func:`massive_layers`). ``first75``: the same thresholds over the
    first 75% of layers (the public profiler's fixed rule).
    """
    layers = stats.layers
    thr = super_expert_threshold(stats, percentile=percentile, max_ratio=max_ratio)
    if thr is None:
        return []
    if rule == "paper":
        stats.require("hidden_max", what="the paper's super-expert rule")
        allowed = set(massive_layers(stats))
    elif rule == "first75":
        n_layers = int(stats.meta.get("num_layers", max(layers) + 1))
        allowed = {layer for layer in layers if layer < 0.75 * n_layers}
    else:
        raise MoekitError(f"unknown super-expert rule '{rule}': use 'paper' or 'first75'")
    out = []
    for layer in layers:
        if layer not in allowed:
            continue
        a = stats.get("down_max", layer).float()
        out += [(layer, int(e)) for e in torch.nonzero(a > thr).flatten().tolist()]
    return out


def super_shared_experts(stats: ExpertStats, *, rule: str = "paper", percentile: float = 99.5,
                         max_ratio: float = 10.0) -> list[int]:
    """Decoder layers whose shared expert passes the routed experts' super-expert threshold, under the same layer
    rule. Shared experts cannot be skipped when routed, but they can carry the massive activation themselves."""
    thr = super_expert_threshold(stats, percentile=percentile, max_ratio=max_ratio)
    if thr is None or not stats.has("shared_down_max"):
        return []
    if rule == "paper":
        allowed = set(massive_layers(stats))
    else:
        n_layers = int(stats.meta.get("num_layers", max(stats.layers) + 1))
        allowed = {layer for layer in stats.layers if layer < 0.75 * n_layers}
    return [layer for layer in stats.layers if layer in allowed and f"shared_down_max.{layer}" in stats.tensors
            and stats.get("shared_down_max", layer).max().item() > thr]


def fingerprint(model, router_weights=None) -> str:
    """Hash of the architecture config and every router weight: identifies 'the same model' for stats files.

    ``router_weights`` (MoE-layer order) stands in for the model's own when those are not in memory
    (the layer-by-layer profiler)."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    if router_weights is None:
        router_weights = [layer.router_weight for layer in moe_layers(model)]
    for w in router_weights:
        h.update(w.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
