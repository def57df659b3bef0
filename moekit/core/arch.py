"""Architecture adapters: one view of every MoE layer, written over transformers' own modules.

Every architecture quirk moekit knows lives in this file. The rest of the package sees an MoE layer
only through :class:`MoELayer`, whose expert weights always come in one canonical orientation:

    gate [E, I, H], up [E, I, H], down [E, H, I]   (y = down @ (act(gate @ x) * (up @ x)))

transformers 5 stores experts fused (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; GPT-OSS
transposed and interleaved, with biases). The view reads and writes those tensors in place, keeps the
module attributes (``num_experts``, ``top_k``) and the model config consistent, and never re-implements
a model: routing and expert maths are the modules' own.

Ungated experts (NemotronH: ``up_proj [E, I, H]``, ``down_proj [E, H, I]``, y = down @ act(up @ x)) have no gate:
their canonical weights are up and down only (no "gate" key, ``gate=None`` where one is passed), and every method
that handles the projections one by one handles the ones present (:attr:`MoELayer.projections`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Sequence

import torch
from torch import nn

from moekit.core.keys import PER_LAYER_EXPERTS_KEY, PER_LAYER_TOP_K_KEY, ROUTE_KEY
from moekit.errors import MoekitError

SELECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")
# the experts module's per-expert tensors (experts on dim 0) in any layout: weights, then biases
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
EXPERT_TENSORS = (*EXPERT_WEIGHTS, "gate_up_proj_bias", "down_proj_bias")


@dataclass(frozen=True)
class Family:
    """What differs between MoE architectures, in one record."""

    name: str
    router_attr: str = "gate"  # the router on the MoE block; dotted when its linear sits deeper ("gate.wg")
    num_experts_key: str = "num_experts"  # config key for routed experts per layer
    expert_size_key: str = "moe_intermediate_size"  # config key for one expert's intermediate size
    top_k_key: str = "num_experts_per_tok"  # config key for the experts each token activates
    block_attr: str = "mlp"  # attribute of a decoder layer holding its MoE block (when the layer is sparse)
    # "concat": gate_up [E,2I,H], down [E,H,I]; "gpt_oss": [E,H,2I] interleaved, [E,I,H]; "llama4": [E,H,2I] (gate
    # then up), [E,I,H], and its experts called on router-scaled inputs (see the Llama-4 record and MoELayer.routing);
    # "ungated": up [E,I,H], down [E,H,I], y = down @ act(up @ x), no gate (NemotronH)
    layout: str = "concat"
    scoring: str = "softmax"  # "softmax" over all experts, "sigmoid" (DeepSeek-V3), "topk_softmax" (top-k on logits first)
    shared_attr: str | None = None  # shared expert module on the block
    shared_gate_attr: str | None = None  # sigmoid gate of the shared expert (Qwen2-MoE)
    dense_model_type: str | None = None  # the dense family an MoE of this kind densifies into
    dense_model_type_unbiased: str | None = None  # ... when its attention biases are absent or all zero
    norm_topk_default: bool = True
    # dotted path from the block to a selection bias that is not on the router or block under one of
    # SELECTION_BIAS_NAMES (ERNIE-4.5: "gate.moe_statics.e_score_correction_bias", shaped [1, E])
    selection_bias_attr: str | None = None
    # the router's forward unpacks [B, T, H] (AFMoE): tokens [T, H] go in as [1, T, H] (:meth:`MoELayer.router_input`)
    router_input_3d: bool = False
    # attribute counting zero-computation ("null") experts the router also scores (LongCat-Flash: ``zero_expert_num``,
    # identity experts), on the experts module or else on the MoE block, whichever holds it (the one that handles the
    # zero experts: see :attr:`MoELayer.zero_experts_owner`). Their router rows sit after the real experts' and are
    # kept untouched; the view's experts are the real ones only (see :attr:`MoELayer.num_zero_experts`)
    zero_experts_attr: str | None = None
    # the fewest experts per token the experts' forward runs with where the experts module handles zero experts itself
    # (LongCat-Flash in transformers 5.24: its forward squeezes the slot dim of its [k, T] mask, failing on one);
    # MoELayer.min_top_k is what applies to a model. set_top_k and route refuse fewer, combine() pads
    min_top_k: int = 1
    # config settings the view cannot handle yet: (key, why), refused by check_supported when the key is set (not None)
    refused_settings: tuple[tuple[str, str], ...] = ()
    # why the family has no dense twin densify could build, where there is more to say than "none in transformers"
    no_dense_reason: str | None = None


def _family(name: str, **kw) -> Family:
    return Family(name, **kw)


# The canonical layout is Qwen3-MoE's: a sparse layer's ``mlp`` holds a router ``gate`` (``weight [E, H]``, ``top_k``)
# whose forward returns (logits, weights, indices), and fused ``experts`` (``gate_up_proj [E, 2I, H]``,
# ``down_proj [E, H, I]``) called as ``experts(x, indices, weights)``. A family record says only where it differs.
# Selection biases (``e_score_correction_bias`` on the router or the block, LFM2's ``expert_bias``) are found on the
# modules themselves (:attr:`MoELayer.selection_bias_owner`). Each family is checked on a tiny model built from its
# own config class by tests/test_families.py.
_DEEPSEEK_LIKE = dict(num_experts_key="n_routed_experts", scoring="sigmoid", shared_attr="shared_experts")
MOE_FAMILIES: dict[str, Family] = {
    # -- softmax routing, no shared expert
    "qwen3_moe": _family("qwen3_moe", dense_model_type="qwen3"),
    "mixtral": _family("mixtral", num_experts_key="num_local_experts", expert_size_key="intermediate_size",
                       dense_model_type="mistral"),
    # OLMoE (pre-norm, full-width q/k norms) has no dense twin in transformers (OLMo2 is post-norm): no dense type.
    "olmoe": _family("olmoe", expert_size_key="intermediate_size", norm_topk_default=False),
    "flex_olmo": _family("flex_olmo", expert_size_key="intermediate_size", norm_topk_default=False),
    "minimax": _family("minimax", num_experts_key="num_local_experts", expert_size_key="intermediate_size"),
    "mellum": _family("mellum", num_experts_key="num_local_experts"),
    "jamba": _family("jamba", block_attr="feed_forward", router_attr="router", expert_size_key="intermediate_size"),
    # -- softmax over the top-k logits only
    "granitemoe": _family("granitemoe", block_attr="block_sparse_moe", router_attr="router",
                          num_experts_key="num_local_experts", expert_size_key="intermediate_size", scoring="topk_softmax"),
    "phimoe": _family("phimoe", router_attr="router", num_experts_key="num_local_experts",
                      expert_size_key="intermediate_size"),
    "cohere2_moe": _family("cohere2_moe", expert_size_key="intermediate_size", scoring="topk_softmax"),
    # the shared MLP of these two runs beside the block on the decoder layer: the view leaves it alone
    "granitemoeshared": _family("granitemoeshared", block_attr="block_sparse_moe", router_attr="router",
                                num_experts_key="num_local_experts", expert_size_key="intermediate_size",
                                scoring="topk_softmax"),
    "granitemoehybrid": _family("granitemoehybrid", block_attr="block_sparse_moe", router_attr="router",
                                num_experts_key="num_local_experts", expert_size_key="intermediate_size",
                                scoring="topk_softmax"),
    "gpt_oss": _family("gpt_oss", router_attr="router", num_experts_key="num_local_experts",
                       expert_size_key="intermediate_size", layout="gpt_oss", scoring="topk_softmax"),
    # -- softmax routing, shared experts (gated by a sigmoid in the Qwen line)
    "qwen2_moe": _family("qwen2_moe", shared_attr="shared_expert", shared_gate_attr="shared_expert_gate",
                         dense_model_type="qwen2", dense_model_type_unbiased="llama"),
    "qwen3_next": _family("qwen3_next", shared_attr="shared_expert", shared_gate_attr="shared_expert_gate"),
    "qwen3_5_moe_text": _family("qwen3_5_moe_text", shared_attr="shared_expert", shared_gate_attr="shared_expert_gate"),
    "lara_mini": _family("lara_mini", shared_attr="shared_expert"),
    "deepseek_v2": _family("deepseek_v2", num_experts_key="n_routed_experts", shared_attr="shared_experts"),
    "hunyuan_v1_moe": _family("hunyuan_v1_moe", router_attr="gate.wg", expert_size_key="intermediate_size",
                              top_k_key="moe_topk", shared_attr="shared_mlp"),
    # ERNIE-4.5: softmax probabilities plus a selection bias choose the top-k (the weights are the probabilities,
    # renormalised); the bias sits on a submodule of the router, ``gate.moe_statics.e_score_correction_bias``, shaped
    # [1, E] (experts on its last dim). Config keys moe_num_experts / moe_k (num_experts / num_experts_per_tok are
    # aliases). Dense MLP layers outside moe_layer_start_index..end_index are skipped like every dense layer.
    "ernie4_5_moe": _family("ernie4_5_moe", num_experts_key="moe_num_experts", top_k_key="moe_k",
                            shared_attr="shared_experts",
                            selection_bias_attr="gate.moe_statics.e_score_correction_bias"),
    # -- sigmoid scores, a selection bias, shared experts (the DeepSeek-V3 line)
    "deepseek_v3": _family("deepseek_v3", **_DEEPSEEK_LIKE, dense_model_type="deepseek_v3"),
    "deepseek_v32": _family("deepseek_v32", **_DEEPSEEK_LIKE),
    "dots1": _family("dots1", **_DEEPSEEK_LIKE),
    "glm4_moe": _family("glm4_moe", **_DEEPSEEK_LIKE),
    "glm4_moe_lite": _family("glm4_moe_lite", **_DEEPSEEK_LIKE),
    "glm_moe_dsa": _family("glm_moe_dsa", **_DEEPSEEK_LIKE),
    "solar_open": _family("solar_open", **_DEEPSEEK_LIKE),
    "axk1": _family("axk1", **_DEEPSEEK_LIKE),
    "axk2": _family("axk2", **_DEEPSEEK_LIKE),
    "kimi_linear": _family("kimi_linear", **{**_DEEPSEEK_LIKE, "num_experts_key": "num_experts"},
                           top_k_key="num_experts_per_token"),
    "exaone_moe": _family("exaone_moe", **{**_DEEPSEEK_LIKE, "num_experts_key": "num_experts"}),
    "kolibri1": _family("kolibri1", num_experts_key="num_local_experts", scoring="sigmoid", shared_attr="shared_experts"),
    "laguna": _family("laguna", scoring="sigmoid", shared_attr="shared_experts"),
    "hy_v3": _family("hy_v3", scoring="sigmoid", shared_attr="shared_experts"),
    "flint": _family("flint", scoring="sigmoid", shared_attr="shared_expert"),
    "hy_v4": _family("hy_v4", **_DEEPSEEK_LIKE),
    # -- sigmoid scores and a selection bias, no shared expert
    "beam": _family("beam", scoring="sigmoid"),
    "mimo_v2_flash": _family("mimo_v2_flash", num_experts_key="n_routed_experts", scoring="sigmoid"),
    "minimax_m2": _family("minimax_m2", num_experts_key="num_local_experts", expert_size_key="intermediate_size",
                          scoring="sigmoid"),
    "lfm2_moe": _family("lfm2_moe", block_attr="feed_forward", scoring="sigmoid"),
    # AFMoE (Arcee Trinity): the router module ``router`` holds its linear at ``router.gate``; sigmoid scores plus the
    # block's ``expert_bias`` (passed to the router's forward, like LFM2) choose the top-k, whose sigmoid scores are
    # renormalised and multiplied by ``route_scale`` (:attr:`MoELayer.routed_scaling_factor`); shared experts. Its
    # router's forward unpacks [B, T, H] (router_input_3d); its outputs are (logits, weights, indices) like Qwen3-MoE's.
    # The first num_dense_layers layers are dense and skipped like every dense layer.
    "afmoe": _family("afmoe", router_attr="router.gate", scoring="sigmoid", shared_attr="shared_experts",
                     router_input_3d=True),
    # LongCat-Flash: each decoder layer holds two attention + dense-MLP sublayers and one "shortcut" MoE block ``mlp``
    # (the view sees that block; the dense ``mlps`` stay as they are). Its router ``router`` (linear at
    # ``router.classifier``) scores n_routed_experts real experts plus ``zero_expert_num`` zero-computation experts
    # (identity: a token routed there adds its input times the weight), rows [E, E+Z); softmax over all E+Z plus the
    # router's ``e_score_correction_bias`` [E+Z] choose the top-k, whose probabilities (not renormalised) are scaled by
    # ``routed_scaling_factor``. The view's experts are the real ones: pruning / merging rewrite the real rows and keep
    # the Z zero-expert rows (weight, selection bias) unchanged at the end. Config keys n_routed_experts
    # (num_local_experts is an alias), moe_topk, expert_ffn_hidden_size. Two module layouts, told apart by where
    # ``zero_expert_num`` sits (:attr:`MoELayer.zero_experts_owner`), both handled:
    # - transformers 5.24: the experts module (LongcatFlashExperts) holds zero_expert_num, num_routed_experts and
    #   total_experts (E+Z), stores ``gate_up_proj`` with E+Z rows (the last Z unused by its forward, kept as they are)
    #   and ``down_proj`` with E, and its forward takes the router's raw indices and adds the identity experts' output
    #   itself; it fails on top-k 1 (min_top_k 2 there).
    # - transformers 5.25: the experts (@use_experts_implementation) hold num_experts and ``gate_up_proj`` [E, 2I, H],
    #   E rows only; the MoE block (LongcatFlashMoE) holds num_routed_experts and zero_expert_num, sends the zero
    #   experts' slots to dummy real experts ((i - E) * E // Z) at weight 0 and adds ``x * identity weight`` after the
    #   experts' forward. Top-k 1 runs. MoELayer.combine and experts_patched give both layouts moekit's calling
    #   convention (raw router indices; the zero experts' output included in combine's result).
    # Llama-4 (Llama4ForCausalLM, model_type llama4_text): the block ``feed_forward`` (Llama4TextMoe) holds a router
    # ``router`` (an nn.Linear) whose forward returns (scores [T, E], logits [T, E]), not (logits, weights, indices):
    # scores are the sigmoid of the top-k logits and exactly 0 elsewhere (no renormalisation). Its experts
    # (Llama4TextExperts: gate_up_proj [E, H, 2I], gate then up halves, down_proj [E, I, H], no biases) are called
    # with no routing arguments on [E*T, H] inputs, every expert on every token with its input already multiplied by
    # the token's score (0 where not chosen, giving exactly 0): the weight scales the expert's input, not its output.
    # MoELayer.routing / router_output translate the router's outputs, combine builds the scaled inputs, and
    # experts_patched runs moekit's (x, indices, weights) forward in its place ("llama4" layout branches). The
    # shared expert (ungated MLP) is the block's ``shared_expert``; dense layers (not in config.moe_layers, from
    # interleave_moe_layer_step) hold a plain MLP at ``feed_forward`` and are skipped. Config keys num_local_experts,
    # num_experts_per_tok, intermediate_size (one expert's; intermediate_size_mlp is the dense layers').
    "llama4_text": _family("llama4_text", block_attr="feed_forward", router_attr="router",
                           num_experts_key="num_local_experts", expert_size_key="intermediate_size", layout="llama4",
                           scoring="sigmoid", shared_attr="shared_expert", norm_topk_default=False),
    # NemotronH (Nemotron-3 Nano): a hybrid of Mamba-2, attention, dense-MLP and MoE decoder layers, each one block
    # ``mixer`` (the view sees the MoE ones: those with ``experts``). DeepSeek-V3 routing (sigmoid scores, the router's
    # e_score_correction_bias, num_group / topk_group, routed_scaling_factor, norm_topk_prob on the router ``gate``)
    # and an ungated shared MLP ``shared_experts``; its routed experts are ungated too (layout "ungated": up_proj
    # [E, I, H], down_proj [E, H, I], act = config.mlp_hidden_act, relu^2). With moe_latent_size set the experts run on
    # a latent projection (fc1_latent_proj / fc2_latent_proj, with biases where mlp_bias) of the block's input: the
    # view's experts take hidden states, so such configs are refused.
    "nemotron_h": _family("nemotron_h", block_attr="mixer", num_experts_key="n_routed_experts", scoring="sigmoid",
                          shared_attr="shared_experts", layout="ungated",
                          refused_settings=(("moe_latent_size", "its experts run on a latent projection of the hidden "
                                             "states (fc1_latent_proj / fc2_latent_proj), which moekit's expert view "
                                             "does not model"),),
                          no_dense_reason="its experts are ungated (relu^2 up / down): densify builds gated "
                                          "gate / up / down FFNs, and its own dense 'mlp' layers are not a target"),
    "longcat_flash": _family("longcat_flash", router_attr="router.classifier", num_experts_key="n_routed_experts",
                             expert_size_key="expert_ffn_hidden_size", top_k_key="moe_topk", norm_topk_default=False,
                             zero_experts_attr="zero_expert_num", min_top_k=2),
}

# MoE families of transformers moekit does not handle yet, and why (what its view would have to learn first).
NOT_SUPPORTED = {
    "inkling2_text": "a saved tiny model does not reload in this transformers (negative size at load; not yet understood)",
    "zaya": "its router is a small MLP with an extra class beyond the experts",
    "inkling_text": "its router scores more classes than it has experts",
    "jetmoe": "its experts are unfused input/output linears (ParallelExperts)",
    "dbrx": "its experts are 2-D stacked w1/v1/w2 tensors, and its config does not build in this transformers",
    "aria_text": "transposed [E, H, 2I] experts",
    "gemma4_text": "its router and experts sit on the decoder layer itself, beside a dense MLP",
    "deepseek_v4": "hash routers on some layers and sqrt-softplus scores",
    "bailing_hybrid": "group-limited routing that fails on a reduced expert count (not yet understood)",
    "glm5_next_text": "hyper-connection residuals and a custom gate activation (not yet tested)",
    "mistral4": "no causal-LM class in transformers' auto mapping",
}

# Dense families moekit can carve into an MoE: gated FFN with gate_proj / up_proj / down_proj.
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

SUPPORTED = tuple(MOE_FAMILIES) + DENSE_FAMILIES



def model_type(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", "?")


def check_supported(model_or_config) -> str:
    mt = model_type(model_or_config)
    if mt in NOT_SUPPORTED:
        raise MoekitError(f"'{mt}' is an MoE family moekit does not handle yet: {NOT_SUPPORTED[mt]} "
                          "(`moekit info --families` lists the supported ones)")
    if mt not in SUPPORTED:
        raise MoekitError(f"unsupported architecture '{mt}': moekit supports {len(MOE_FAMILIES)} MoE families and the "
                          f"dense {', '.join(DENSE_FAMILIES)} (`moekit info --families`); convert the model to one of them")
    family = MOE_FAMILIES.get(mt)
    config = getattr(model_or_config, "config", model_or_config)
    for key, why in (family.refused_settings if family else ()):
        if getattr(config, key, None) is not None:
            raise MoekitError(f"'{mt}' with {key}={getattr(config, key)} is not handled yet: {why} "
                              f"(configs with {key} unset are)")
    return mt


def is_moe(model) -> bool:
    return model_type(model) in MOE_FAMILIES


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` in every supported family)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise MoekitError(f"cannot find decoder layers on {type(model).__name__}; is this a causal language model?")
    return layers


def final_norm(model) -> nn.Module:
    """The norm after the last decoder layer (``model.model.norm``; NemotronH's ``norm_f``)."""
    inner = getattr(model, "model", model)
    norm = getattr(inner, "norm", None)
    return norm if norm is not None else inner.norm_f


class MoELayer:
    """Architecture-neutral view of one sparse MoE block (router, routed experts, shared experts)."""

    def __init__(self, model: nn.Module, index: int, block: nn.Module, family: Family):
        self.model = model
        self.index = index
        self.block = block
        self.family = family

    # ----------------------------------------------------------------- structure
    @property
    def router(self) -> nn.Module:
        """The router module (its forward picks the experts; it holds ``top_k``)."""
        return getattr(self.block, self.family.router_attr.split(".")[0])

    @property
    def router_linear(self) -> nn.Module:
        """The module holding the router's ``weight [E, H]`` (and ``bias``): the router itself in most families."""
        module = self.block
        for name in self.family.router_attr.split("."):
            module = getattr(module, name)
        return module

    @property
    def experts(self) -> nn.Module:
        return self.block.experts

    @property
    def num_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])

    @property
    def gated(self) -> bool:
        """Whether the experts have a gate projection (all but NemotronH's: y = down @ act(up @ x))."""
        return self.family.layout != "ungated"

    @property
    def projections(self) -> tuple[str, ...]:
        """The canonical projections the experts have: gate, up, down; or up, down (ungated)."""
        return ("gate", "up", "down") if self.gated else ("up", "down")

    @property
    def expert_size(self) -> int:
        if not self.gated:
            return int(self.experts.up_proj.shape[1])
        gu = self.experts.gate_up_proj
        return int(gu.shape[-1] // 2 if self.family.layout in ("gpt_oss", "llama4") else gu.shape[1] // 2)

    @property
    def hidden_size(self) -> int:
        return int(self.router_linear.weight.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def zero_experts_owner(self) -> nn.Module | None:
        """The module holding the zero-expert count (:attr:`Family.zero_experts_attr`), the one that handles the zero
        experts in the forward: LongCat-Flash's experts module in transformers 5.24 (its forward takes the raw router
        indices), its MoE block in 5.25 (the experts' forward sees real experts only); None without zero experts."""
        attr = self.family.zero_experts_attr
        if not attr:
            return None
        for module in (self.experts, self.block):
            if hasattr(module, attr):
                return module
        return None

    @property
    def num_zero_experts(self) -> int:
        """Zero-computation experts the router scores after the real ones (LongCat-Flash's identity experts; 0
        elsewhere). They have no weights of their own in the view: indices [E, E+Z) of the router's output."""
        owner = self.zero_experts_owner
        return int(getattr(owner, self.family.zero_experts_attr, 0) or 0) if owner is not None else 0

    @property
    def zero_experts_in_block(self) -> bool:
        """True where the block, not the experts module, handles the zero experts (LongCat-Flash, transformers 5.25):
        the experts' own forward then takes real experts' indices only and leaves out the identity output."""
        return self.num_zero_experts > 0 and self.zero_experts_owner is self.block

    @property
    def min_top_k(self) -> int:
        """The fewest experts per token this layer's experts' forward runs with: :attr:`Family.min_top_k` where the
        experts module handles zero experts itself (LongCat-Flash, transformers 5.24), 1 where the block does (5.25)."""
        if self.family.zero_experts_attr and self.zero_experts_owner is not self.experts:
            return 1
        return self.family.min_top_k

    @property
    def router_weight(self) -> torch.Tensor:
        """The router rows of the real experts [E, H] (a view without the zero experts' rows, where there are some)."""
        w = self.router_linear.weight
        return w[: self.num_experts] if self.num_zero_experts else w

    @property
    def router_bias(self) -> torch.Tensor | None:
        b = getattr(self.router_linear, "bias", None)
        return b[: self.num_experts] if b is not None and self.num_zero_experts else b

    @property
    def selection_bias_owner(self) -> tuple[nn.Module, str] | None:
        """Where the bias added to scores for selection only lives: DeepSeek-V3's ``e_score_correction_bias`` on the
        router, MiniMax-M2's on the block, LFM2's ``expert_bias`` on the block, where the family record says
        (:attr:`Family.selection_bias_attr`, ERNIE-4.5's ``gate.moe_statics``); None when the family has none.
        The tensor holds the experts on its last dim (1-D, or ERNIE's [1, E])."""
        if self.family.selection_bias_attr:
            *path, name = self.family.selection_bias_attr.split(".")
            module = self.block
            for attr in path:
                module = getattr(module, attr)
            return module, name
        for module in (self.router, self.block):
            for name in SELECTION_BIAS_NAMES:
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    return module, name
        return None

    @property
    def correction_bias(self) -> torch.Tensor | None:
        """The selection bias [E] (see :attr:`selection_bias_owner`), or None; ERNIE-4.5's [1, E] is viewed as [E]."""
        owner = self.selection_bias_owner
        if owner is None:
            return None
        t = getattr(*owner)
        return t if t.dim() == 1 else t.reshape(-1)

    @property
    def norm_topk_prob(self) -> bool:
        return bool(getattr(self.router, "norm_topk_prob", self.family.norm_topk_default))

    @property
    def routed_scaling_factor(self) -> float:
        """The constant the router multiplies its (renormalised) top-k weights by: DeepSeek-V3's
        ``routed_scaling_factor``, AFMoE's ``route_scale``; 1 elsewhere."""
        r = self.router
        return float(getattr(r, "routed_scaling_factor", None) or getattr(r, "route_scale", None) or 1.0)

    @property
    def n_group(self) -> int:
        return int(getattr(self.router, "num_group", None) or 1)

    @property
    def topk_group(self) -> int:
        return int(getattr(self.router, "topk_group", None) or 1)

    @property
    def shared_expert(self) -> nn.Module | None:
        return getattr(self.block, self.family.shared_attr) if self.family.shared_attr else None

    @property
    def shared_gate(self) -> nn.Module | None:
        return getattr(self.block, self.family.shared_gate_attr) if self.family.shared_gate_attr else None

    @property
    def skip_index(self) -> int | None:
        """The index a dropped routing slot may carry (the expert count), or None where the experts' forward cannot
        skip it. Only the eager forward of the non-GPT-OSS families skips it; GPT-OSS's one-hot has no extra class,
        ``batched_mm`` gathers weights by index, and ``grouped_mm`` leaves the skipped rows unset (NaN * 0)."""
        if self.family.layout == "llama4":  # combine() gives a skipped slot score 0 (its expert's input is then 0)
            return self.num_experts
        impl = getattr(self.model.config, "_experts_implementation", None) or "eager"
        if self.family.layout == "gpt_oss" or impl != "eager" or self.num_zero_experts:
            return None  # with zero experts index E is the first identity expert, not a skip
        return self.num_experts

    def selection_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] scores whose order is the router's choice order (DeepSeek-V3 adds its correction bias to the sigmoid
        scores, ERNIE-4.5 to the softmax probabilities)."""
        cb = self.correction_bias
        if cb is not None and cb.shape[-1] > logits.shape[-1]:  # logits of the real experts only (zero experts)
            cb = cb[: logits.shape[-1]]
        if self.family.scoring == "sigmoid":
            return logits.float().sigmoid() + (0 if cb is None else cb.float())
        if cb is not None:  # a softmax router with a selection bias (ERNIE-4.5)
            return torch.softmax(logits.float(), dim=-1) + cb.float()
        return logits.float()

    @property
    def act_fn(self):
        return getattr(self.experts, "act_fn", None)

    def expert_param_count(self) -> int:
        """Parameters of one routed expert (weights and biases)."""
        n = len(self.projections) * self.expert_size * self.hidden_size
        if self.family.layout == "gpt_oss":
            n += 2 * self.expert_size + self.hidden_size
        return n

    # ----------------------------------------------------------------- weights
    def expert_weights(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """Canonical gate [E,I,H], up [E,I,H], down [E,H,I] (no gate for ungated experts): copies, or (``copy=False``)
        read-only views of the parameters (no memory; for a caller that only reads them before replacing the experts)."""
        if not self.gated:
            out = {"up": self.experts.up_proj.detach(), "down": self.experts.down_proj.detach()}
            return {k: v.clone() for k, v in out.items()} if copy else out
        gu, dn = self.experts.gate_up_proj.detach(), self.experts.down_proj.detach()
        gu = gu[: dn.shape[0]]  # LongCat-Flash stores E+Z gate_up rows in 5.24 (the zero experts' unused), E in 5.25
        if self.family.layout == "gpt_oss":
            out = {"gate": gu[..., 0::2].transpose(1, 2), "up": gu[..., 1::2].transpose(1, 2), "down": dn.transpose(1, 2)}
        elif self.family.layout == "llama4":  # [E, H, 2I]: gate then up halves; down [E, I, H]
            i = gu.shape[-1] // 2
            out = {"gate": gu[..., :i].transpose(1, 2), "up": gu[..., i:].transpose(1, 2), "down": dn.transpose(1, 2)}
        else:
            i = gu.shape[1] // 2
            out = {"gate": gu[:, :i], "up": gu[:, i:], "down": dn}
        return {k: v.clone() for k, v in out.items()} if copy else out

    def expert_biases(self) -> dict[str, torch.Tensor] | None:
        """GPT-OSS only: gate [E,I], up [E,I], down [E,H]."""
        if self.family.layout != "gpt_oss":
            return None
        b = self.experts.gate_up_proj_bias.detach()
        return {"gate": b[:, 0::2].clone(), "up": b[:, 1::2].clone(), "down": self.experts.down_proj_bias.detach().clone()}

    def _write_experts(self, gate, up, down, biases=None) -> None:
        ex = self.experts
        ref = ex.down_proj
        kw = dict(device=ref.device, dtype=ref.dtype)
        if not self.gated:
            ex.up_proj = nn.Parameter(up.to(**kw).contiguous(), requires_grad=ref.requires_grad)
            ex.down_proj = nn.Parameter(down.to(**kw).contiguous(), requires_grad=ref.requires_grad)
            ex.intermediate_dim = int(up.shape[1])
        elif self.family.layout == "gpt_oss":
            e, i, h = gate.shape
            gu = torch.empty(e, h, 2 * i, **kw)
            gu[..., 0::2] = gate.transpose(1, 2)
            gu[..., 1::2] = up.transpose(1, 2)
            ex.gate_up_proj = nn.Parameter(gu, requires_grad=ref.requires_grad)
            ex.down_proj = nn.Parameter(down.transpose(1, 2).contiguous().to(**kw), requires_grad=ref.requires_grad)
            if biases is None:
                biases = {"gate": torch.zeros(e, i), "up": torch.zeros(e, i), "down": torch.zeros(e, h)}
            gub = torch.empty(e, 2 * i, **kw)
            gub[:, 0::2], gub[:, 1::2] = biases["gate"], biases["up"]
            ex.gate_up_proj_bias = nn.Parameter(gub, requires_grad=ref.requires_grad)
            ex.down_proj_bias = nn.Parameter(biases["down"].to(**kw).contiguous(), requires_grad=ref.requires_grad)
            ex.intermediate_size = i
        elif self.family.layout == "llama4":
            gu = torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=-1).to(**kw)
            ex.gate_up_proj = nn.Parameter(gu.contiguous(), requires_grad=ref.requires_grad)
            ex.down_proj = nn.Parameter(down.transpose(1, 2).contiguous().to(**kw), requires_grad=ref.requires_grad)
            ex.intermediate_size = ex.expert_dim = int(gate.shape[1])
        else:
            gu = torch.cat([gate, up], dim=1).to(**kw)
            if self.num_zero_experts and ex.gate_up_proj.shape[0] > ref.shape[0]:
                # the zero experts' stored (unused) gate_up rows stay at the end (LongCat-Flash, transformers 5.24)
                old = ex.gate_up_proj.detach()[ref.shape[0]:]
                if old.shape[1] != gu.shape[1]:
                    old = old.new_zeros(old.shape[0], *gu.shape[1:])
                gu = torch.cat([gu, old.to(**kw)])
            ex.gate_up_proj = nn.Parameter(gu.contiguous(), requires_grad=ref.requires_grad)
            ex.down_proj = nn.Parameter(down.to(**kw).contiguous(), requires_grad=ref.requires_grad)
            ex.intermediate_dim = int(gate.shape[1])
        self._set_counts(int(up.shape[0]))

    def _set_counts(self, n: int) -> None:
        """The modules' own expert counts after a change to ``n`` real experts. LongCat-Flash's router keeps
        ``n_routed_experts`` (real + zero, the width of its scores); ``num_routed_experts`` (real) sits on its
        experts (with ``total_experts``, real + zero; transformers 5.24) or on its block (5.25, which maps the zero
        experts' slots with it): each one present is updated."""
        ex, z = self.experts, self.num_zero_experts
        ex.num_experts = n
        self.router.num_experts = n
        if self.family.layout == "llama4":  # Llama4TextMoe keeps its own count too (unused by its forward)
            self.block.num_experts = n
        if z:
            for module in (ex, self.block):
                if hasattr(module, "num_routed_experts"):
                    module.num_routed_experts = n
            if hasattr(ex, "total_experts"):
                ex.total_experts = n + z
            self.router.n_routed_experts = n + z

    def _with_zero_rows(self, t: torch.Tensor | None, current: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of the real experts ``t`` followed by the zero experts' rows of the ``current`` router tensor (their
        last Z entries on the expert dim, 0 for weights and biases), unchanged; ``t`` itself where there are none."""
        z = self.num_zero_experts
        if not z or t is None or current is None:
            return t
        return torch.cat([t.to(device=current.device, dtype=current.dtype), current.detach()[-z:]])

    def _write_router(self, weight, bias=None, correction_bias=None) -> None:
        r = self.router_linear
        ref = r.weight
        n = int(weight.shape[0])
        if self.num_zero_experts:  # the zero experts' rows stay, unchanged, after the new real ones
            owner = self.selection_bias_owner
            weight = self._with_zero_rows(weight, ref)
            if getattr(r, "bias", None) is not None:
                bias = self._with_zero_rows(bias if bias is not None else torch.zeros(n), r.bias)
            if owner is not None:
                cb = correction_bias if correction_bias is not None else torch.zeros(n)
                correction_bias = self._with_zero_rows(cb, getattr(*owner).reshape(-1))
        r.weight = nn.Parameter(weight.to(device=ref.device, dtype=ref.dtype).contiguous(), requires_grad=ref.requires_grad)
        if getattr(r, "bias", None) is not None:
            b = bias if bias is not None else torch.zeros(weight.shape[0])
            r.bias = nn.Parameter(b.to(device=r.bias.device, dtype=r.bias.dtype).contiguous(), requires_grad=ref.requires_grad)
        owner = self.selection_bias_owner
        if owner is not None:
            module, name = owner
            old = getattr(module, name)
            cb = correction_bias if correction_bias is not None else torch.zeros(weight.shape[0])
            # the owner's leading dims stay (ERNIE-4.5's [1, E] -> [1, E']); the experts are on the last dim
            cb = cb.to(device=ref.device, dtype=old.dtype).reshape(*old.shape[:-1], -1).contiguous()
            setattr(module, name, nn.Parameter(cb, requires_grad=False) if isinstance(old, nn.Parameter) else cb)
        self._set_counts(n)

    def block_tensors(self, gate, up, down, router_weight, router_bias=None, biases=None) -> dict[str, torch.Tensor]:
        """Canonical expert weights and router rows as the block's own parameters, keyed by their names in
        ``self.block`` and kept differentiable: for ``torch.func.functional_call(layer.block, ...)``. The block
        must already hold this many experts (``replace_experts``); ``gate`` is None for ungated experts."""
        r = self.family.router_attr
        if not self.gated:
            out = {"experts.up_proj": up, "experts.down_proj": down}
        elif self.family.layout == "gpt_oss":
            gu = torch.stack([gate.transpose(1, 2), up.transpose(1, 2)], dim=-1).flatten(-2)  # interleave gate/up
            out = {"experts.gate_up_proj": gu, "experts.down_proj": down.transpose(1, 2)}
            if biases is not None:
                out["experts.gate_up_proj_bias"] = torch.stack([biases["gate"], biases["up"]], dim=-1).flatten(-2)
                out["experts.down_proj_bias"] = biases["down"]
        elif self.family.layout == "llama4":
            out = {"experts.gate_up_proj": torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=-1),
                   "experts.down_proj": down.transpose(1, 2)}
        else:
            out = {"experts.gate_up_proj": torch.cat([gate, up], dim=1), "experts.down_proj": down}
        lin = self.router_linear
        out[f"{r}.weight"] = self._with_zero_rows(router_weight, lin.weight)  # zero experts' rows: constant
        if router_bias is not None and self.router_bias is not None:
            out[f"{r}.bias"] = self._with_zero_rows(router_bias, lin.bias)
        return out

    def block_forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The whole block (routed + shared) on x [B, T, H] -> [B, T, H]; ``params`` (from :meth:`block_tensors`)
        stand in for the block's own parameters, differentiably. GPT-OSS's block also returns router scores."""
        out = self.block(x) if params is None else torch.func.functional_call(self.block, params, (x,))
        return out[0] if isinstance(out, tuple) else out

    # ----------------------------------------------------------------- operations
    def keep_experts(self, keep: Sequence[int]) -> None:
        """Keep only these routed experts (in this order); the router loses exactly the other rows."""
        keep = [int(e) for e in keep]
        if len(set(keep)) != len(keep) or any(e < 0 or e >= self.num_experts for e in keep):
            raise MoekitError(f"layer {self.index}: expert indices {keep} are out of range 0..{self.num_experts - 1} or repeated")
        if not keep:
            raise MoekitError(f"layer {self.index}: zero experts would remain; keep at least top-k ({self.top_k}) experts")
        if len(keep) < self.top_k:
            raise MoekitError(f"layer {self.index}: top-k {self.top_k} is larger than the {len(keep)} experts kept; "
                              "keep more experts or lower top-k")
        if len(keep) % self.n_group:
            raise MoekitError(f"layer {self.index}: {len(keep)} experts do not divide into n_group={self.n_group} "
                              f"groups; keep a multiple of {self.n_group}")
        idx = torch.tensor(keep, dtype=torch.long)
        ex = self.experts
        e, z = self.num_experts, self.num_zero_experts
        # the kept router rows, read while the view still sees E experts (router_weight is [E, H] with zero experts)
        router = (
            self.router_weight.detach()[idx],
            None if self.router_bias is None else self.router_bias.detach()[idx],
            None if self.correction_bias is None else self.correction_bias.detach()[idx],
        )
        # every per-expert tensor is indexed along its first (expert) dimension in its stored layout: the kept
        # experts are the only new memory (no canonical copies of the whole layer on the way); rows past the real
        # experts (LongCat-Flash's zero experts' gate_up rows, transformers 5.24) stay at the end
        for name in EXPERT_TENSORS:
            old = getattr(ex, name, None)
            if old is not None:
                rows = torch.cat([idx, torch.arange(e, old.shape[0])]) if z and old.shape[0] > e else idx
                setattr(ex, name, nn.Parameter(old.detach()[rows.to(old.device)], requires_grad=old.requires_grad))
        ex.num_experts = len(keep)
        self._write_router(*router)
        sync_config(self.model)

    def replace_experts(self, gate, up, down, router_weight, router_bias=None, correction_bias=None, biases=None) -> None:
        """Replace the routed experts (any new count) and the router rows that pick them (``gate`` None: ungated)."""
        if (gate is None) == self.gated:
            raise MoekitError(f"layer {self.index}: {self.family.name}'s experts are {'' if self.gated else 'un'}gated, "
                              f"so replace_experts wants {'a gate' if self.gated else 'gate=None'}; this is a moekit bug")
        e = int(up.shape[0])
        if e == 0:
            raise MoekitError(f"layer {self.index}: zero experts would remain; keep at least top-k ({self.top_k}) experts")
        if self.top_k > e:
            raise MoekitError(
                f"layer {self.index}: top-k {self.top_k} is larger than the {e} experts kept; keep more experts or lower top-k"
            )
        if e % self.n_group:
            raise MoekitError(
                f"layer {self.index}: {e} experts do not divide into n_group={self.n_group} groups; keep a multiple of {self.n_group}"
            )
        if not ((gate is None or up.shape == gate.shape) and down.shape == (e, up.shape[2], up.shape[1])
                and router_weight.shape[0] == e):
            raise MoekitError(f"layer {self.index}: inconsistent expert shapes up {tuple(up.shape)}, down {tuple(down.shape)}")
        self._write_experts(gate, up, down, biases)
        self._write_router(router_weight, router_bias, correction_bias)
        sync_config(self.model)

    def set_top_k(self, k: int) -> None:
        k = int(k)
        if k < 1 or k > self.num_experts:
            raise MoekitError(f"layer {self.index}: top-k {k} must be between 1 and the {self.num_experts} experts in the layer")
        if k < self.min_top_k:
            raise MoekitError(f"layer {self.index}: top-k {k} is below {self.min_top_k}, the fewest experts per "
                              f"token {self.family.name}'s experts run with in transformers")
        if self.n_group > 1 and k > self.topk_group * (self.num_experts // self.n_group):
            raise MoekitError(f"layer {self.index}: top-k {k} exceeds what topk_group={self.topk_group} groups can supply")
        self.router.top_k = k
        for module in (self.block, self.experts):
            if hasattr(module, "top_k"):
                module.top_k = k
        sync_config(self.model)

    # ----------------------------------------------------------------- maths
    def router_extra_args(self) -> tuple:
        """What the block passes its router beside the tokens: the selection bias, where the block holds it
        (MiniMax-M2, LFM2-MoE); nothing elsewhere."""
        owner = self.selection_bias_owner
        return (getattr(*owner),) if owner is not None and owner[0] is self.block else ()

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens as the router's forward takes them: as given, or [T, H] as [1, T, H] where the router unpacks
        [B, T, H] (AFMoE, :attr:`Family.router_input_3d`); every router returns flat [T, ...] outputs either way."""
        return x.unsqueeze(0) if self.family.router_input_3d and x.dim() == 2 else x

    @torch.no_grad()
    def route(self, x: torch.Tensor):
        """The router's own forward on tokens [T, H] -> (logits [T,E], weights [T,k], indices [T,k])."""
        return self.routing(self.router(self.router_input(x), *self.router_extra_args()))

    def routing(self, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router's forward output (what a hook on it sees) as (logits [T,E], weights [T,k], indices [T,k]).
        Llama-4's router returns (scores [T,E], logits): its choice is the top-k of the scores (the sigmoid of the
        top-k logits, 0 elsewhere, so the same experts in the same order), weighted by those scores; a slot scored
        exactly 0 (dropped by a re-routing, or a sigmoid that underflowed: its expert's input is 0 either way) gets
        the skip index E."""
        if self.family.layout != "llama4":
            return out[0], out[1], out[2]
        scores, logits = out[0], out[1]
        weights, indices = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        return logits, weights, indices.masked_fill(weights == 0, scores.shape[-1])

    def router_output(self, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> tuple:
        """The inverse of :meth:`routing`: routing decisions in the router's own output form (what a replaced
        router forward or a hook rewriting its output returns). Llama-4: (scores [T,E], logits), each chosen
        expert's weight at its index, 0 elsewhere and for skipped slots (index >= E)."""
        if self.family.layout != "llama4":
            return logits, weights, indices
        e = logits.shape[-1]
        valid = indices < e
        scores = torch.zeros_like(logits).scatter_add_(1, indices.clamp_max(e - 1), (weights * valid).to(logits.dtype))
        return scores, logits

    @property
    def weights_scale_input(self) -> bool:
        """True where a routing weight multiplies the expert's input, not its output (Llama-4: E(w x), not w E(x))."""
        return self.family.layout == "llama4"

    @contextmanager
    def experts_patched(self, forward):
        """Inside, moekit's ``forward(x [T,H], indices [T,k], weights [T,k]) -> [T,H]`` (the routed output, the
        Qwen3-MoE experts' calling convention) runs in place of the experts module's own forward (an instance
        patch; the module's own, or an earlier patch, comes back on exit). Llama-4's block calls its experts on
        [E*T, H] router-scaled inputs with no routing arguments: a hook on its router keeps the tokens and routing of
        the running block forward for ``forward``, whose output goes back as expert 0's rows (the block sums the E
        row groups; the others are 0). With zero experts ``forward`` sees the router's own indices, [E, E+Z) included,
        and adds :meth:`zero_expert_output` for them (LongCat-Flash 5.24, whose experts module adds it; in 5.25 its
        block adds it, and ``forward`` gets those slots at weight 0)."""
        ex = self.experts
        had_own, previous = "forward" in vars(ex), vars(ex).get("forward")
        handle = None
        if self.family.layout == "llama4":
            seen = {}

            def keep(_module, args, out):
                seen["x"], seen["routing"] = args[0], self.routing(out)

            def llama4_forward(routed_in):
                if "routing" not in seen:  # called outside its block's forward (e.g. combine() inside the patch)
                    raise MoekitError(f"layer {self.index}: {self.family.name}'s patched experts ran without their "
                                      "router's forward first; call the block, not the experts")
                _, weights, indices = seen.pop("routing")
                out = forward(seen.pop("x"), indices, weights)
                return torch.cat([out, out.new_zeros(routed_in.shape[0] - out.shape[0], out.shape[-1])])

            handle = self.router.register_forward_hook(keep)
            ex.forward = llama4_forward
        elif self.zero_experts_in_block:
            # LongCat-Flash, transformers 5.25: the block hands its experts dummy real experts (weight 0) for the zero
            # experts' slots and adds their identity output itself. ``forward`` gets the router's own indices (a hook
            # keeps them), the zero experts' slots at weight 0: it adds nothing for them, and no expert sees them
            raw = {}

            def keep_raw(_module, args, out):
                raw["routing"] = self.routing(out)

            def zero_forward(x, indices, weights):
                routing = raw.pop("routing", None)
                if routing is not None and routing[2].shape == indices.shape:
                    _, w, i = routing
                    hit = i >= self.num_experts
                    if torch.equal(torch.where(hit, indices, i), indices):  # the block's own call on that routing
                        indices, weights = i, w.masked_fill(hit, 0.0).to(weights.dtype)
                return forward(x, indices, weights)

            handle = self.router.register_forward_hook(keep_raw)
            ex.forward = zero_forward
        else:
            ex.forward = forward
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
            if had_own:
                ex.forward = previous
            else:
                del ex.forward

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Router probability of every expert [T, E] (softmax over all; sigmoid scores for DeepSeek-V3). Logits of
        the router's own width E+Z (zero experts) give the real experts' probabilities of that softmax, [T, E]."""
        if self.family.scoring == "sigmoid":
            return logits.float().sigmoid()
        p = torch.softmax(logits.float(), dim=-1)
        return p[..., : self.num_experts] if self.num_zero_experts and p.shape[-1] > self.num_experts else p

    def zero_expert_output(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """What the zero experts add to the routed output for routing (indices/weights [T,k]) of tokens x [T, H]:
        LongCat-Flash's identity experts give x times the weight of every slot routed to one; None without them."""
        z = self.num_zero_experts
        if not z:
            return None
        hit = (indices >= self.num_experts) & (indices < self.num_experts + z)
        return x * (weights.float() * hit).sum(-1, keepdim=True).to(x.dtype)

    def _route_zero_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor):
        """LongCat-Flash's block (transformers 5.25) around its experts: the zero experts' slots (indices [E, E+Z)) go
        to dummy real experts ((i - E) * E // Z) at weight 0, and their identity output ``x * weight`` is added after
        the experts' forward. Returns (indices, weights, identity [T, H]), computed the way the block does."""
        e, z = self.num_experts, self.num_zero_experts
        hit = indices >= e
        identity = x * weights.masked_fill(~hit, 0.0).sum(dim=-1, keepdim=True)
        indices = torch.where(hit, (indices - e) * e // z, indices)
        return indices, weights.masked_fill(hit, 0.0), identity

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Output of routed expert ``e`` on tokens x [T, H], before the routing weight."""
        ex = self.experts
        if not self.gated:  # its own maths: down @ act(up @ x)
            return nn.functional.linear(ex.act_fn(nn.functional.linear(x, ex.up_proj[e])), ex.down_proj[e])
        if self.family.layout == "gpt_oss":
            gate_up = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
            return ex._apply_gate(gate_up) @ ex.down_proj[e] + ex.down_proj_bias[e]
        if self.family.layout == "llama4":  # its own maths: up * act(gate), [H, 2I] and [I, H] per expert
            gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
            return (up * ex.act_fn(gate)) @ ex.down_proj[e]
        return nn.functional.linear(self._gated(nn.functional.linear(x, ex.gate_up_proj[e])), ex.down_proj[e])

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Intermediate activation act(gate x) * (up x) of expert ``e`` on x [T, H] -> [T, I] (ungated: act(up x))."""
        ex = self.experts
        if not self.gated:
            return ex.act_fn(nn.functional.linear(x, ex.up_proj[e]))
        if self.family.layout == "gpt_oss":
            return ex._apply_gate(x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e])
        if self.family.layout == "llama4":
            gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
            return up * ex.act_fn(gate)
        return self._gated(nn.functional.linear(x, ex.gate_up_proj[e]))

    def _gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of a concatenated [.., 2I] projection: the experts' own ``_apply_gate`` where they define
        one (clamped or soft-capped SwiGLU: HY-V4, Inkling-2), else ``act_fn``."""
        ex = self.experts
        if hasattr(ex, "_apply_gate"):
            return ex._apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return ex.act_fn(gate) * up

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared-expert output on x [T, H], its gate applied; None when the layer has none."""
        if self.shared_expert is None:
            return None
        out = self.shared_expert(x)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out

    def combine(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Routed output for explicit routing decisions (weights/indices [T,k]); index >= E means 'skip'.
        ``params`` (from :meth:`block_tensors`) stand in for the experts' own weights, differentiably."""
        # transformers' grouped_mm path leaves such rows undefined: weight 0. Zero experts (E..E+Z-1) are not skips
        skip = indices >= self.num_experts + self.num_zero_experts
        if bool(skip.any()):
            indices, weights = indices.masked_fill(skip, 0), weights.masked_fill(skip, 0)
        pad = self.min_top_k - indices.shape[-1]
        if pad > 0:  # slots the experts' forward needs (LongCat-Flash, 5.24): the first expert again, at weight 0
            indices = torch.cat([indices, indices[:, :1].expand(-1, pad)], dim=-1)
            weights = torch.cat([weights, torch.zeros_like(weights[:, :1]).expand(-1, pad)], dim=-1)
        own = {k.removeprefix("experts."): v for k, v in (params or {}).items() if k.startswith("experts.")}
        if self.zero_experts_in_block:  # LongCat-Flash, 5.25: what its block does around its experts' forward
            indices, weights, identity = self._route_zero_experts(x, indices, weights)
            out = self.experts(x, indices, weights.to(x.dtype)) if params is None else \
                torch.func.functional_call(self.experts, own, (x, indices, weights.to(x.dtype)))
            return out + identity.to(out.dtype)
        if self.family.layout == "llama4":
            # as its block calls them: every expert on every token, the input times the token's score for it (0
            # where not chosen, skipped slots included: weight 0 above), [E*T, H]; the outputs summed over experts
            e, t = self.num_experts, x.shape[0]
            scores = x.new_zeros(t, e).scatter_add(1, indices, weights.to(x.dtype))
            routed_in = x.repeat(e, 1) * scores.transpose(0, 1).reshape(-1, 1)
            out = self.experts(routed_in) if params is None else torch.func.functional_call(self.experts, own, (routed_in,))
            return out.view(e, t, -1).sum(0)
        if params is None:
            return self.experts(x, indices, weights.to(x.dtype))
        return torch.func.functional_call(self.experts, own, (x, indices, weights.to(x.dtype)))

    def __repr__(self) -> str:
        return (f"MoELayer(layer={self.index}, family={self.family.name}, experts={self.num_experts}, "
                f"top_k={self.top_k}, expert_size={self.expert_size}, shared={self.shared_expert is not None})")


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of ``model`` as a :class:`MoELayer` (dense layers are skipped)."""
    mt = model_type(model)
    family = MOE_FAMILIES.get(mt)
    if family is None:
        return []
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, family.block_attr, None)
        if block is not None and hasattr(block, "experts"):
            out.append(MoELayer(model, i, block, family))
    return out


def require_moe(model: nn.Module) -> list[MoELayer]:
    check_supported(model)
    layers = moe_layers(model)
    if not layers:
        raise MoekitError(
            f"'{model_type(model)}' is a dense model with no MoE layers; run `moekit carve` first to turn it into an MoE"
        )
    return layers


def sync_config(model: nn.Module) -> None:
    """Write the layers' expert counts and top-k back into the config.

    Uniform counts go into the standard keys (a checkpoint plain transformers loads); differing counts
    go into moekit's opt-in per-layer keys, which :func:`moekit.load_model` reads.
    """
    layers = moe_layers(model)
    if not layers:
        return
    config = model.config
    family = layers[0].family
    counts = {layer.index: layer.num_experts for layer in layers}
    topks = {layer.index: layer.top_k for layer in layers}
    if len(set(counts.values())) == 1:
        setattr(config, family.num_experts_key, next(iter(counts.values())))
        _drop(config, PER_LAYER_EXPERTS_KEY)
    else:
        setattr(config, family.num_experts_key, max(counts.values()))
        setattr(config, PER_LAYER_EXPERTS_KEY, {str(k): v for k, v in counts.items()})
    if len(set(topks.values())) == 1:
        setattr(config, family.top_k_key, next(iter(topks.values())))
        _drop(config, PER_LAYER_TOP_K_KEY)
    else:
        setattr(config, family.top_k_key, max(topks.values()))
        setattr(config, PER_LAYER_TOP_K_KEY, {str(k): v for k, v in topks.items()})


def _drop(config, key: str) -> None:
    if hasattr(config, key):
        delattr(config, key)


def is_uniform(model: nn.Module) -> bool:
    return not any(hasattr(model.config, key) for key in (PER_LAYER_EXPERTS_KEY, PER_LAYER_TOP_K_KEY, ROUTE_KEY))


def moekit_tensors(model: nn.Module) -> list[str]:
    """State-dict keys of moekit-only tensors (buffers named ``moekit_*``), which plain transformers cannot load."""
    return [k for k in model.state_dict() if k.rpartition(".")[2].startswith("moekit_")]


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters: total, in routed experts, and active per token (top-k experts + everything else)."""
    total = sum(p.numel() for p in model.parameters())
    # tied embeddings are one tensor; parameters() already de-duplicates them
    layers = moe_layers(model)
    in_experts = sum(layer.num_experts * layer.expert_param_count() for layer in layers)
    active_experts = sum(layer.top_k * layer.expert_param_count() for layer in layers)
    return {"total": total, "experts": in_experts, "active": total - in_experts + active_experts}


def describe(model: nn.Module) -> dict:
    """What ``moekit info`` prints."""
    check_supported(model)
    layers = moe_layers(model)
    counts = param_counts(model)
    shared = [layer for layer in layers if layer.shared_expert is not None]
    return {
        "architecture": type(model).__name__,
        "model_type": model_type(model),
        "layers": len(decoder_layers(model)),
        "moe_layers": len(layers),
        "experts_per_layer": sorted({layer.num_experts for layer in layers}),
        "top_k": sorted({layer.top_k for layer in layers}),
        "expert_size": sorted({layer.expert_size for layer in layers}),
        "shared_experts": bool(shared),
        "shared_expert_size": sorted({_shared_size(layer) for layer in shared}),
        "params_total": counts["total"],
        "params_experts": counts["experts"],
        "params_active": counts["active"],
    }


def _shared_size(layer: MoELayer) -> int:
    sh = layer.shared_expert
    return int(sh.down_proj.weight.shape[1]) if hasattr(sh, "down_proj") else 0


# Per-expert checkpoint names on disk (what transformers 5 fuses on load; Mixtral also renames the block).
_DISK_BLOCK_RENAMES = {"block_sparse_moe.": "mlp."}
_DISK_EXPERT_RENAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def fuse_layer_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors as stored on disk (keys relative to the layer) -> the module's state-dict keys.

    Per-expert tensors ``mlp.experts.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj`` (Mixtral:
    ``block_sparse_moe.experts.{e}.w1/w3/w2``) are stacked into ``mlp.experts.gate_up_proj [E, 2I, H]`` and
    ``mlp.experts.down_proj [E, H, I]``, the way transformers fuses them on load; anything else (already fused
    checkpoints, GPT-OSS, attention, norms) passes through unchanged.
    """
    import re

    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    pattern = re.compile(r"^(.*experts)\.(\d+)\.(\w+)\.weight$")
    for key, value in state.items():
        for old, new in _DISK_BLOCK_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        m = pattern.match(key)
        if m is None:
            out[key] = value
            continue
        proj = _DISK_EXPERT_RENAMES.get(m.group(3), m.group(3))
        per_expert.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[proj] = value
    for prefix, experts in per_expert.items():
        n = len(experts)
        if sorted(experts) != list(range(n)) or any(set(p) != {"gate_proj", "up_proj", "down_proj"} for p in experts.values()):
            raise MoekitError(f"checkpoint experts under '{prefix}' are incomplete (need gate/up/down for experts 0..{n - 1})")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in range(n)])
    return out


def family_table() -> list[dict]:
    """One row per supported MoE family: where things sit, how it routes, and what each command does with it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    rows = []
    for name, f in MOE_FAMILIES.items():
        shared = f.shared_attr or "-"
        if f.shared_gate_attr:
            shared += f" (gate {f.shared_gate_attr})"
        rows.append({
            "family": name,
            "architecture": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(name, "?"),
            "block": f"{f.block_attr}.{f.router_attr}",
            "routing": "top-k, then sigmoid; weights scale the experts' input" if f.layout == "llama4" else  # Llama-4
                       {"softmax": "softmax", "sigmoid": "sigmoid + selection bias",
                        "topk_softmax": "top-k, then softmax"}[f.scoring]
                       + (" + selection bias" if f.selection_bias_attr and f.scoring == "softmax" else "")  # ERNIE
                       + (" + zero (identity) experts" if f.zero_experts_attr else ""),  # LongCat-Flash
            "shared experts": shared,
            "prune / merge / route": "yes (route: no compensate)" if f.layout == "llama4" else "yes",
            "densify into": f.dense_model_type_unbiased and f"{f.dense_model_type} / {f.dense_model_type_unbiased}"
                            or f.dense_model_type or "-",
        })
    return rows
