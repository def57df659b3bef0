"""Checkpoint names <-> the model's state-dict names, through transformers' own conversion mapping.

transformers 5 loads many families through renamings (``block_sparse_moe.`` -> ``mlp.``, ``attention_sink_bias`` ->
``sinks`` ...) and converters (per-expert ``experts.{e}.gate_proj.weight`` stacked into ``experts.gate_up_proj``);
``save_pretrained`` applies the reverse. moekit reads and writes checkpoints a layer at a time, so it applies the
same mappings to one layer's tensors: :func:`to_model_names` the way ``from_pretrained`` does,
:func:`to_checkpoint_names` the way ``save_pretrained`` does. No per-family list lives in moekit.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import torch


def to_model_names(model, state: dict[str, torch.Tensor | Callable[[], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Tensors named as in a checkpoint (full names, any subset: one decoder layer) -> the model's state-dict names
    and layouts. Values may be functions returning the tensor (read when its converter runs, as transformers' own
    loading does)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    conversions = get_model_conversion_mapping(model) or []
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending: dict = {}
    for key, tensor in sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])):
        new_key, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            pattern = key
            transform = pending.setdefault(new_key, WeightRenaming(key, new_key))
        else:
            transform = pending.setdefault(new_key, deepcopy(by_pattern[pattern]))
        transform.add_tensor(new_key, key, pattern, tensor)
    out = {}
    for first, transform in pending.items():
        for name, value in transform.convert(first, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out


def to_checkpoint_names(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state-dict tensors (any subset) -> the names and layouts ``save_pretrained`` writes."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)
