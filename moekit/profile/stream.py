"""Memory-bounded profiling: one decoder layer in memory at a time, read from the checkpoint on disk.

The model is built as an empty skeleton (``accelerate.init_empty_weights``). A first pass embeds every
calibration sequence and records what the model hands each decoder layer (attention mask, rotary
embeddings, positions) by running the model's own forward with the layers stubbed out. Then, layer by
layer: the layer's tensors are read from the safetensors files (per-expert tensors fused the way
transformers fuses them on load, :func:`moekit.arch.fuse_layer_checkpoint`), the layer runs over all the
hidden states (kept on CPU) with the same instrumentation as the in-memory profiler, and is freed.
Peak memory: one layer, the embedding table during the first pass, and the hidden states.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.core.hooks import StopForward
from moekit.errors import MoekitError
from moekit.profile.observe import LayerAccumulator, ModelAccumulator, eager_attention, observe_layer, observe_model
from moekit.profile.profile import ProfileConfig, build_stats, check_tokens, gram_sample, model_meta, num_heads, rows_in
from moekit.checkpoint.load import local_checkpoint
from moekit.checkpoint.read import skeleton
from moekit.checkpoint.safetensors_io import CheckpointReader
from moekit.profile.stats import ExpertStats


def materialise(module: torch.nn.Module, state: dict[str, torch.Tensor], device, dtype, what: str) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MoekitError(f"checkpoint does not match the model at {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device=device, dtype=dtype)


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the system (glibc keeps freed heap memory otherwise, and the
    many expert-sized tensors of each layer would pile up as fragmentation)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@contextmanager
def stubbed_layers(layers, calls: dict):
    """Decoder layers replaced by stubs that record their inputs; the last one stops the forward pass."""
    for j, dl in enumerate(layers):
        def stub(hidden_states, *args, j=j, **kwargs):
            calls.setdefault(j, (hidden_states, args, kwargs))
            if j == len(layers) - 1:
                raise StopForward
            return hidden_states

        dl.forward = stub
    try:
        yield
    finally:
        for dl in layers:
            del dl.forward


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


@torch.no_grad()
def profile_stream(name: str | Path, tokens: torch.Tensor, config: ProfileConfig | None = None, *,
                   device: str | None = None, dtype=None) -> ExpertStats:
    """Same statistics as :func:`moekit.profile.profile`, with one decoder layer in memory at a time."""
    from moekit.core.device import pick_device, pick_dtype

    config = config or ProfileConfig()
    tokens = check_tokens(tokens)
    path = local_checkpoint(name, purpose="--stream")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model = skeleton(path)
    moe = arch.require_moe(model)
    reader = CheckpointReader(path)
    body = getattr(model, "model", model)
    layers = arch.decoder_layers(model)
    n_seq, seq_len = tokens.shape
    batches = [(i, min(i + config.batch_size, n_seq)) for i in range(0, n_seq, config.batch_size)]

    # pass 0: embeddings and what each layer is called with (per batch size). Only the embedding rows of the
    # tokens that occur are read; the ids are renumbered to index them (the lookup is all the model does with ids).
    used, compact_ids = torch.unique(tokens, return_inverse=True)
    body.embed_tokens.weight = torch.nn.Parameter(reader.rows("model.embed_tokens.weight", used).to(dev, dt),
                                                  requires_grad=False)
    padding_idx, body.embed_tokens.padding_idx = body.embed_tokens.padding_idx, None  # only matters for gradients
    if hasattr(body, "rotary_emb"):  # real (non-persistent) buffers
        body.rotary_emb.to(dev)
    hidden = torch.empty(n_seq, seq_len, model.config.hidden_size, dtype=dt)
    layer_calls: dict[int, dict] = {}
    with eager_attention(model, config.attn_sink):
        for a, b in tqdm(batches, desc="embed", disable=not config.progress, leave=False):
            calls: dict = {}
            with stubbed_layers(layers, calls):
                try:
                    body(input_ids=compact_ids[a:b].to(dev), use_cache=False)
                except StopForward:
                    pass
            hidden[a:b] = calls[0][0].to("cpu", dt)
            if b - a not in layer_calls:
                layer_calls[b - a] = {j: (args, kwargs) for j, (_, args, kwargs) in calls.items()}
    body.embed_tokens.to("meta")
    body.embed_tokens.padding_idx = padding_idx

    by_index = {layer.index: layer for layer in moe}
    accs: list[LayerAccumulator] = []
    router_weights = []
    model_acc = ModelAccumulator(len(layers), dev, attn_sink=config.attn_sink, num_heads=num_heads(model.config))
    sample = gram_sample(tokens.numel(), config.gram_tokens, config.seed)
    with eager_attention(model, config.attn_sink):
        for i, dl in enumerate(tqdm(layers, desc="profile (stream)", disable=not config.progress)):
            state = arch.fuse_layer_checkpoint(reader.read(f"model.layers.{i}."))
            materialise(dl, state, dev, dt, f"layer {i}")
            with ExitStack() as stack:
                stack.enter_context(observe_model(model, model_acc, offset=i, layers=[dl]))
                acc = None
                if i in by_index:
                    acc = LayerAccumulator(by_index[i], dev, gram=config.gram_tokens > 0)
                    stack.enter_context(observe_layer(acc))
                    accs.append(acc)
                    router_weights.append(by_index[i].router_weight.detach().float().cpu().clone())
                for a, b in batches:
                    if acc is not None:
                        acc.sample_rows = rows_in(sample, a * seq_len, b * seq_len, dev)
                    args, kwargs = layer_calls[b - a][i]
                    out = dl(hidden[a:b].to(dev), *args, **kwargs)
                    hidden[a:b] = (out[0] if isinstance(out, tuple) else out).to("cpu", dt)
            dl.to("meta")
            release_freed_memory()
    meta = model_meta(model, moe, router_weights=router_weights)
    meta["stream"] = True
    return build_stats(meta, accs, model_acc, tokens, config)
