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

import json
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


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointReader:
    """Reads named tensors -- or chosen rows of one -- from a directory of safetensors files.

    It reads with plain file reads at the offsets the safetensors header gives, instead of ``safe_open``'s
    memory map: every page of a mapped file that is touched counts in the process's resident memory, which
    would put the whole embedding table (and more) into the peak this mode exists to bound.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where: dict[str, tuple[Path, dict, int]] = {}  # name -> (file, header entry, data start)
        for f in sorted(self.path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for key, entry in header.items():
                if key != "__metadata__":
                    self.where[key] = (f, entry, 8 + n)

    def _entry(self, key: str):
        if key not in self.where:
            raise MoekitError(f"tensor '{key}' is not in the checkpoint at {self.path}")
        f, entry, start = self.where[key]
        if entry["dtype"] not in _DTYPES:
            raise MoekitError(f"tensor '{key}' has dtype {entry['dtype']}, which --stream cannot read; use the in-memory mode")
        return f, _DTYPES[entry["dtype"]], list(entry["shape"]), start + entry["data_offsets"][0]

    def tensor(self, key: str) -> torch.Tensor:
        f, dtype, shape, offset = self._entry(key)
        out = torch.empty(shape, dtype=dtype)
        with open(f, "rb") as fh:
            fh.seek(offset)
            fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (sorted, unique) of a 2-D tensor, read one contiguous run at a time."""
        f, dtype, shape, offset = self._entry(key)
        out = torch.empty(len(index), shape[1], dtype=dtype)
        row_bytes = out[0].numel() * out.element_size()
        buf = out.view(torch.uint8).numpy()
        idx = index.tolist()
        with open(f, "rb") as fh:
            i = 0
            while i < len(idx):
                j = i
                while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
                    j += 1
                fh.seek(offset + idx[i] * row_bytes)
                fh.readinto(memoryview(buf[i : j + 1]))
                i = j + 1
        return out

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keys relative to it."""
        return {key[len(prefix):]: self.tensor(key) for key in self.where if key.startswith(prefix)}


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
                except _Stop:
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
    meta = model_meta(model, moe, router_weights=router_weights)
    meta["stream"] = True
    return build_stats(meta, accs, model_acc, tokens, config)
