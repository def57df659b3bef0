"""Width pruning of dense FFNs by Minitron activation importance (the densify control)."""

from __future__ import annotations

import pytest
import torch

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.densify.neuron_prune import NeuronPruneConfig, neuron_importance, prune_neurons_
from tiny import ids, tiny_model


def test_prune_keeps_the_active_neurons_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from moekit.checkpoint.save import save_model

    model = tiny_model("llama")
    with torch.no_grad():  # neurons 0..31 of every layer are dead: they must be the ones removed
        for layer in arch.decoder_layers(model):
            layer.mlp.up_proj.weight[:32] = 0
    ref = tiny_model("llama")
    with torch.no_grad():
        for layer in arch.decoder_layers(ref):
            layer.mlp.up_proj.weight[:32] = 0
    kept = prune_neurons_(model, NeuronPruneConfig(width=32), tokens=ids())["kept"]
    assert all(k.tolist() == list(range(32, 64)) for k in kept.values())
    assert model.config.intermediate_size == 32
    with torch.no_grad():  # removing dead neurons changes nothing
        torch.testing.assert_close(model(ids()).logits, ref(ids()).logits, atol=1e-5, rtol=1e-5)
    out = save_model(model, None, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.intermediate_size == 32


def test_importance_is_mean_abs_down_input():
    model = tiny_model("qwen3")
    x = ids(batch=1, length=8)
    imp = neuron_importance(model, x)
    captured = {}
    h = arch.decoder_layers(model)[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("a", a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    torch.testing.assert_close(imp[1], captured["a"].abs().flatten(0, 1).mean(0))


def test_bad_width_and_moe_refused():
    with pytest.raises(MoekitError, match="width 65"):
        prune_neurons_(tiny_model("llama"), NeuronPruneConfig(width=65), tokens=ids())
    with pytest.raises(MoekitError, match="dense models"):
        prune_neurons_(tiny_model("qwen3_moe"), NeuronPruneConfig(width=8), tokens=ids())
