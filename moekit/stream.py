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

from . import arch
from .errors import MoekitError
from .observe import LayerAccumulator, ModelAccumulator, eager_attention, observe_layer, observe_model
from .profile import ProfileConfig, build_stats, check_tokens, gram_sample, model_meta, num_heads, rows_in
from .stats import ExpertStats


def checkpoint_dir(name: str | Path) -> Path:
    """The local safetensors directory behind a model name (the embedded defaults included)."""
    from .models import smollm2_path

    if str(name) == "smollm2":
        return smollm2_path()
    if str(name) == "smollm2-moe":
        from .carve import embedded_moe_path

        return Path(embedded_moe_path())
    path = Path(name).expanduser()
    if not path.is_dir() or not (path / "config.json").exists():
        raise MoekitError(f"--stream reads a local checkpoint directory (config.json + *.safetensors); '{name}' is not one")
    if not any(path.glob("*.safetensors")):
        raise MoekitError(f"'{path}' has no *.safetensors weights; --stream reads safetensors only")
    return path


class CheckpointReader:
    """Reads tensors by name from a directory of safetensors files without loading the rest."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self.where: dict[str, Path] = {}
        for f in sorted(self.path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    self.where[key] = f

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keys relative to it."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key, f in self.where.items():
            if key.startswith(prefix):
                by_file.setdefault(f, []).append(key)
        out = {}
        for f, keys in by_file.items():
            with safe_open(str(f), "pt") as st:
                for key in keys:
                    out[key[len(prefix):]] = st.get_tensor(key).clone()
        return out


def skeleton(path: Path):
    """The model on the meta device (non-persistent buffers such as rotary frequencies are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import _resize_empty, restore_moekit_state

    config = AutoConfig.from_pretrained(path)
    arch.check_supported(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    counts = getattr(config, arch.PER_LAYER_EXPERTS_KEY, None) or {}
    for layer in arch.moe_layers(model):
        n = int(counts.get(str(layer.index), layer.num_experts))
        if n != layer.num_experts:
            _resize_empty(layer, n)
    restore_moekit_state(model)
    return model.eval()


def materialise(module: torch.nn.Module, state: dict[str, torch.Tensor], device, dtype, what: str) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MoekitError(f"checkpoint does not match the model at {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device=device, dtype=dtype)


class _Stop(Exception):
    pass


@contextmanager
def stubbed_layers(layers, calls: dict):
    """Decoder layers replaced by stubs that record their inputs; the last one stops the forward pass."""
    for j, dl in enumerate(layers):
        def stub(hidden_states, *args, j=j, **kwargs):
            calls.setdefault(j, (hidden_states, args, kwargs))
            if j == len(layers) - 1:
                raise _Stop
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
    from .models import pick_device, pick_dtype

    config = config or ProfileConfig()
    tokens = check_tokens(tokens)
    path = checkpoint_dir(name)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model = skeleton(path)
    moe = arch.require_moe(model)
    reader = CheckpointReader(path)
    body = getattr(model, "model", model)
    layers = arch.decoder_layers(model)
    n_seq, seq_len = tokens.shape
    batches = [(i, min(i + config.batch_size, n_seq)) for i in range(0, n_seq, config.batch_size)]

    # pass 0: embeddings and what each layer is called with (per batch size)
    materialise(body.embed_tokens, reader.read("model.embed_tokens."), dev, dt, "the embedding")
    if hasattr(body, "rotary_emb"):  # real (non-persistent) buffers
        body.rotary_emb.to(dev)
    hidden = torch.empty(n_seq, seq_len, model.config.hidden_size, dtype=dt)
    layer_calls: dict[int, dict] = {}
    with eager_attention(model, config.attn_sink):
        for a, b in tqdm(batches, desc="embed", disable=not config.progress, leave=False):
            calls: dict = {}
            with stubbed_layers(layers, calls):
                try:
                    body(input_ids=tokens[a:b].to(dev), use_cache=False)
                except _Stop:
                    pass
            hidden[a:b] = calls[0][0].to("cpu", dt)
            if b - a not in layer_calls:
                layer_calls[b - a] = {j: (args, kwargs) for j, (_, args, kwargs) in calls.items()}
    body.embed_tokens.to("meta")

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
    meta = model_meta(model, moe, router_weights=router_weights)
    meta["stream"] = True
    return build_stats(meta, accs, model_acc, tokens, config)
