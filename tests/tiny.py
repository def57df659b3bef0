"""Tiny random-initialised models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(family: str, **over):
    from transformers import AutoConfig

    kw = dict(COMMON)
    if family == "qwen2_moe":
        kw.update(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                  num_experts_per_tok=2, norm_topk_prob=False)
    elif family == "qwen3_moe":
        kw.update(intermediate_size=64, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                  head_dim=8)
    elif family == "mixtral":
        kw.update(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    elif family == "olmoe":
        kw.update(intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    elif family == "deepseek_v3":
        kw.update(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5,
                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
                  num_key_value_heads=4, norm_topk_prob=True, rope_interleave=False)
    elif family == "gpt_oss":
        kw.update(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                  layer_types=["sliding_attention", "full_attention"])
    elif family in ("llama", "mistral", "qwen2", "qwen3"):
        kw.update(intermediate_size=64)
        if family == "qwen3":
            kw.update(head_dim=8)
    else:
        return generic_tiny_config(family, **over)
    kw.update(over)
    return AutoConfig.for_model(family, **kw)


# Every other family: its own config class's defaults, with each size key it has shrunk to tiny values and every
# layer made sparse where the config says which layers are (derived from the config, not written per family).
TINY = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=64, max_position_embeddings=128,
    num_experts=8, num_local_experts=8, n_routed_experts=8, num_experts_per_tok=2, num_experts_per_token=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=24, n_shared_experts=1,
    n_group=2, topk_group=1, first_k_dense_replace=0, decoder_sparse_step=1, mlp_only_layers=[],
    kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    index_head_dim=8, index_n_heads=2, index_topk=4,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, full_attention_interval=2,
    mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2, use_mamba_kernels=False, mamba_n_heads=4, mamba_d_head=16,
    mamba_n_groups=1, mamba_chunk_size=8, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
    expert_layer_offset=0, num_dense_layers=0, sliding_window=16, use_cache=True, tie_word_embeddings=False,
    moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0,  # ERNIE-4.5's names
    route_scale=2.5,  # AFMoE's scale on its renormalised top-k weights (not 1, so that it is exercised)
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type")
FROM_NONE = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "head_dim",
             "num_key_value_heads", "mlp_only_layers", "num_experts_per_tok", "n_shared_experts")
HYBRID = {  # hybrid families: one layer of each kind
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # NemotronH: Mamba-2, MoE, attention, dense MLP, MoE layers (two MoE layers around the others)
    "nemotron_h": {"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp", "moe"]},
}
# families whose size keys have their own names (LongCat-Flash: num_layers decoder layers of two sublayers each; two
# zero (identity) experts beside the eight real ones, so that tokens are routed to them; Llama-4's expert size)
OWN_KEYS = {
    "longcat_flash": dict(num_layers=2, moe_topk=3, zero_expert_num=2, ffn_hidden_size=64, expert_ffn_hidden_size=16),
    # Llama-4: intermediate_size is one expert's (and the shared expert's), intermediate_size_mlp the dense layers'
    "llama4_text": dict(intermediate_size=16, intermediate_size_mlp=64),
    # NemotronH: its Mamba-2 sizes and shared-expert width under their own names; a routed scale that is not 1
    "nemotron_h": dict(mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8,
                       moe_shared_expert_intermediate_size=24, routed_scaling_factor=2.5),
}


def generic_tiny_config(family: str, **over):
    from transformers import AutoConfig

    default = AutoConfig.for_model(family).to_dict()
    kw = {k: v for k, v in TINY.items() if k in default and (default[k] is not None or k in FROM_NONE)}
    if "kv_lora_rank" in default:  # multi-head latent attention: every head its own key/value, rope dims agree
        kw.update(num_key_value_heads=TINY["num_attention_heads"], head_dim=TINY["qk_rope_head_dim"])
    n = TINY["num_hidden_layers"]
    for key in PER_LAYER_LISTS:  # keep the family's pattern over the first layers, every kind represented
        value = default.get(key)
        if isinstance(value, list) and value:
            kinds = list(dict.fromkeys(value))
            kw[key] = (kinds + value)[:n] if len(kinds) <= n else value[:n]
    kw.update(HYBRID.get(family, {}))
    kw.update(OWN_KEYS.get(family, {}))
    kw.update(over)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **over)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init of routers/experts is tiny-valued in some families; make routing decisive and outputs visible
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith("e_score_correction_bias"):  # ERNIE-4.5's is a [1, E] parameter
                p.normal_(0, 0.2)
            elif "bias" in name:
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model.eval()


MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss")  # the classic six, every test
ALL_MOE_FAMILIES = tuple(__import__("moekit.core.arch", fromlist=["MOE_FAMILIES"]).MOE_FAMILIES)
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def ids(vocab: int = 96, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
