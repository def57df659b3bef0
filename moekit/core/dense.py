"""MoE -> dense: which standard dense family an MoE densifies into, and that family's config."""

from __future__ import annotations

from torch import nn

from moekit.core.arch import MOE_FAMILIES, model_type
from moekit.core.keys import PER_LAYER_EXPERTS_KEY, PER_LAYER_TOP_K_KEY
from moekit.errors import MoekitError

# Config keys that only describe MoE routing; never copied into a dense config.
_MOE_ONLY_KEYS = ("architectures", "model_type", "intermediate_size", "_name_or_path", "transformers_version",
                  PER_LAYER_EXPERTS_KEY, PER_LAYER_TOP_K_KEY)
_ATTN_BIAS_SUFFIXES = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias")


def has_attention_bias(model: nn.Module) -> bool:
    """Whether any attention projection carries a non-zero bias."""
    return any(name.endswith(_ATTN_BIAS_SUFFIXES) and bool(p.detach().abs().max() > 0)
               for name, p in model.named_parameters())


def dense_model_type(model: nn.Module) -> str:
    """The standard dense family an MoE model densifies into (Qwen3-MoE -> Qwen3, Mixtral -> Mistral, ...).

    Qwen2-MoE goes to Qwen2 (whose q/k/v biases hold the MoE's), or to Llama when those biases are absent or
    all zero, as in an MoE carved from a Llama model (the carved SmolLM2 default).
    """
    mt = model_type(model)
    family = MOE_FAMILIES.get(mt)
    if family is not None and family.no_dense_reason:
        raise MoekitError(f"moekit cannot densify '{mt}': {family.no_dense_reason}")
    if family is None or family.dense_model_type is None:
        known = ", ".join(f"{k} -> {f.dense_model_type}" for k, f in MOE_FAMILIES.items() if f.dense_model_type)
        raise MoekitError(f"moekit cannot densify '{mt}' into a standard dense model; supported: {known}")
    if family.dense_model_type_unbiased and not has_attention_bias(model):
        return family.dense_model_type_unbiased
    return family.dense_model_type


def dense_config(model: nn.Module, intermediate_size: int):
    """A config of :func:`dense_model_type` with the MoE's attention/embedding settings and one FFN width."""
    from transformers import AutoConfig

    target = dense_model_type(model)
    src = model.config.to_dict()
    known = AutoConfig.for_model(target).to_dict()
    kw = {k: v for k, v in src.items() if k in known and k not in _MOE_ONLY_KEYS}
    kw["intermediate_size"] = int(intermediate_size)
    if target == "llama":
        kw.update(attention_bias=False, mlp_bias=False)
    if target == "deepseek_v3":  # DeepSeek-V3 with every layer dense is its own dense form
        kw["first_k_dense_replace"] = int(model.config.num_hidden_layers)
    config = AutoConfig.for_model(target, **kw)
    return config
