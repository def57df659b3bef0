"""The layer-sequential engine: one decoder layer in memory at a time, read from the checkpoint and written back.

A model of any depth runs in the memory of one decoder layer (plus the calibration hidden states):

1. the model is built as a skeleton on the meta device (no weights);
2. the calibration tokens are embedded, and what the model hands each decoder layer (attention mask, rotary
   embeddings, positions) is recorded by running the model's own forward with the layers stubbed out;
3. for each decoder layer i: its tensors are read from the checkpoint's shards (FP8 block-scaled weights
   dequantized, per-expert tensors fused the way transformers fuses them on load), the layer is built on the
   device, the method sees it (:class:`Layer`): it may run the hidden states through it (:meth:`Layer.forward`),
   gather statistics with hooks, and change it in place; then the layer's tensors go to the output shards
   (:class:`~moekit.checkpoint.shard_writer.ShardWriter`) in transformers' on-disk names, and the layer is freed;
4. :meth:`LayerSequential.finish` writes the rest (embeddings, final norm, head, config, tokenizer files).

The hidden states passed on to layer i+1 are what layer i computed *before* the method changed it (the original
model's activations, what the in-memory path calibrates on), unless the method runs :meth:`Layer.forward` again
after changing it (error propagation: the next layer then sees the compressed model's activations).

Methods are per-layer functions; their in-memory twins call the same functions on a loaded model.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.checkpoint.names import to_checkpoint_names, to_model_names
from moekit.core import arch
from moekit.core.hooks import StopForward
from moekit.errors import MoekitError

log = logging.getLogger("moekit")

# files of a checkpoint directory that the engine writes itself; every other file (tokenizer, chat template,
# generation config ...) is copied as it is
OWN_FILES = ("config.json",)


@dataclass
class Layer:
    """Decoder layer ``index`` while it is in memory: its module on the device, and its MoE view (None for a dense
    or hybrid layer without experts)."""

    index: int
    module: torch.nn.Module
    moe: arch.MoELayer | None
    engine: LayerSequential
    replacement: dict[str, torch.Tensor] | None = None  # written instead of the module's tensors (densify)

    @torch.no_grad()
    def forward(self, update: bool = True) -> None:
        """Run every calibration sequence through the layer (batch by batch, hooks fire as in a full forward);
        with ``update`` the hidden states become the layer's outputs (the next layer's inputs)."""
        for a, b in self.engine.batches:
            self.forward_batch(a, b, update)

    @torch.no_grad()
    def forward_batch(self, a: int, b: int, update: bool = True) -> None:
        """:meth:`forward` for calibration sequences ``a:b`` only."""
        e = self.engine
        args, kwargs = e.calls[b - a][self.index]
        out = self.module(e.hidden[a:b].to(e.device), *args, **kwargs)
        if update:
            e.hidden[a:b] = (out[0] if isinstance(out, tuple) else out).to("cpu", e.dtype)

    @property
    def device(self) -> torch.device:
        return self.engine.device


class LayerSequential:
    """Walk the decoder layers of the checkpoint at ``path`` one at a time.

    ``tokens`` [n_seq, seq_len]: calibration sequences (None: the layers are visited without hidden states, e.g.
    to rewrite them from a plan made beforehand). ``out``: a folder (a staged one) to write the transformed
    checkpoint into, or None to write nothing. ``dtype``: the dtype layers compute in (default: float32 on CPU,
    bfloat16 on CUDA); the written checkpoint keeps the source's float dtype (FP8 sources are written in bfloat16).
    """

    def __init__(self, path: str | Path, tokens: torch.Tensor | None = None, *, device: str | None = None,
                 dtype=None, batch_size: int = 4, progress: bool = True, desc: str = "layers",
                 attention: str | None = None):
        from moekit.checkpoint.load import local_checkpoint
        from moekit.checkpoint.read import skeleton
        from moekit.checkpoint.safetensors_io import CheckpointReader
        from moekit.core.device import pick_device, pick_dtype

        self.path = local_checkpoint(path, purpose="the layer-sequential mode")
        map_large_allocations()
        self.device = torch.device(pick_device(device))
        self.dtype = pick_dtype(dtype, self.device)
        self.model = skeleton(self.path)
        if attention:  # e.g. "eager": the profile's attention-sink statistics need the attention probabilities
            self.model.set_attn_implementation(attention)
        self.reader = CheckpointReader(self.path)
        self.layers = arch.decoder_layers(self.model)
        self.moe = {layer.index: layer for layer in arch.moe_layers(self.model)}
        self.prefix = _layers_prefix(self.model)
        self.disk_prefix = _disk_name(self.model, self.prefix)  # the same in the checkpoint (NemotronH: backbone.)
        self.save_dtype = _save_dtype(self.reader)
        self.read_dtype = self.save_dtype if self.reader.is_fp8 else None  # FP8 dequantized straight to bf16
        self.batch_size, self.progress, self.desc = batch_size, progress, desc
        self.writer = None
        self.target = self.model  # the model being written: another one when the method changes the architecture
        self.hidden: torch.Tensor | None = None
        self.calls: dict[int, dict] = {}
        self.batches: list[tuple[int, int]] = []
        if tokens is not None:
            self._embed(tokens)

    # ------------------------------------------------------------------------------------------ input
    @torch.no_grad()
    def _embed(self, tokens: torch.Tensor) -> None:
        """Embed ``tokens`` and record each decoder layer's call arguments per batch size. Only the embedding rows of
        the tokens that occur are read; ids are renumbered to index them (the lookup is all the model does with ids)."""
        body = getattr(self.model, "model", self.model)
        n_seq, seq_len = tokens.shape
        self.batches = [(i, min(i + self.batch_size, n_seq)) for i in range(0, n_seq, self.batch_size)]
        used, compact = torch.unique(tokens, return_inverse=True)
        emb = body.get_input_embeddings()  # embed_tokens; NemotronH's embeddings
        emb.weight = torch.nn.Parameter(self.reader.rows(f"{self._embed_key()}", used).to(self.device, self.dtype),
                                        requires_grad=False)
        padding_idx, emb.padding_idx = emb.padding_idx, None  # only matters for gradients
        if getattr(body, "rotary_emb", None) is not None:  # real (non-persistent) buffers
            body.rotary_emb.to(self.device)
        self.hidden = torch.empty(n_seq, seq_len, self.model.config.hidden_size, dtype=self.dtype)
        for a, b in tqdm(self.batches, desc="embed", disable=not self.progress, leave=False):
            calls = record_calls(self.model, self.layers, compact[a:b].to(self.device))
            self.hidden[a:b] = calls[0][0].to("cpu", self.dtype)
            self.calls.setdefault(b - a, {j: (args, kwargs) for j, (_, args, kwargs) in calls.items()})
        emb.to("meta")
        emb.padding_idx = padding_idx

    def _embed_key(self) -> str:
        for name, p in self.model.named_parameters():
            if p is self.model.get_input_embeddings().weight:
                return _disk_name(self.model, name)
        raise MoekitError("cannot find the embedding table's name; this is a moekit bug")

    def read_routers(self) -> None:
        """Give the skeleton its routers' real tensors (weights, biases, selection biases: experts × hidden per layer,
        small), enough for fingerprints, statistics checks and plans before the walk."""
        names = {id(t): n for n, t in self.model.state_dict(keep_vars=True).items()}
        wanted = []
        for layer in self.moe.values():
            owners = [(layer.router_linear, "weight"), (layer.router_linear, "bias")]
            owners += [layer.selection_bias_owner] if layer.selection_bias_owner else []
            wanted += [names[id(getattr(m, a))] for m, a in owners if getattr(m, a, None) is not None]
        self.read_into_skeleton(wanted)

    def read_into_skeleton(self, names: list[str]) -> None:
        """Read the skeleton's tensors ``names`` (state-dict names; small ones: routers, biases) from the checkpoint."""
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner)
            t = getattr(module, attr)
            disk = next(iter(to_checkpoint_names(self.model, {name: t})))
            value = self.reader.tensor(disk).to(self.dtype)
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=False) if isinstance(t, torch.nn.Parameter) else value)

    # ------------------------------------------------------------------------------------------ the walk
    def write_to(self, folder: Path, *, standard: bool = True, max_shard_bytes: int | None = None) -> None:
        """Write every visited layer (and, in :meth:`finish`, the rest) into ``folder``: transformers' names and
        shards for a ``standard`` checkpoint, moekit's own form otherwise."""
        from moekit.checkpoint.paths import NON_UNIFORM_WEIGHTS
        from moekit.checkpoint.shard_writer import DEFAULT_SHARD_BYTES, ShardWriter

        stem, suffix = ("model", ".safetensors") if standard else (NON_UNIFORM_WEIGHTS.rsplit(".", 1)[0], ".st")
        meta = None if standard else {"moekit": "non-uniform"}
        self.standard = standard
        self.writer = ShardWriter(folder, prefix=stem, suffix=suffix, max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES,
                                  metadata=meta)
        self.out = Path(folder)

    def __iter__(self) -> Iterator[Layer]:
        extra = self.reader.extra_layers(len(self.layers), self.disk_prefix)
        if extra and self.writer is not None:
            log.warning("moekit: dropping decoder layers %s stored beyond num_hidden_layers=%d (a multi-token-"
                        "prediction module, which moekit does not compress): the written checkpoint has none", extra,
                        len(self.layers))
        for i, module in enumerate(tqdm(self.layers, desc=self.desc, disable=not self.progress)):
            prefix = f"{self.prefix}{i}."
            disk = self.reader.readers(f"{self.disk_prefix}{i}.", self.read_dtype)
            state = {k[len(prefix):]: v for k, v in to_model_names(self.model, disk).items()}
            materialise(module, state, self.device, self.dtype, f"layer {i}")
            del state
            layer = Layer(i, module, self.moe.get(i), self)
            yield layer
            if self.writer is not None:
                self.writer.write(self.disk_state(i, layer.replacement or module.state_dict()))
            del layer
            module.to("meta")
            release_freed_memory()

    def disk_state(self, i: int, layer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors (keys relative to the layer) under their checkpoint names (per-expert names for a
        standard checkpoint, as transformers' save_pretrained writes them), in the written dtype."""
        state = {f"{self.prefix}{i}.{k}": v.to(self.save_dtype) if v.is_floating_point() else v
                 for k, v in layer_state.items()}
        if not self.standard:
            return state
        return to_checkpoint_names(self.target, state)

    def finish(self, report=None) -> None:
        """Write everything outside the decoder layers (as stored), the config and the other files; close the shards."""
        if self.writer is None:
            return
        if self.target is self.model:
            arch.sync_config(self.model)
        n = len(self.layers)
        p = self.disk_prefix
        rest = [k for k in self.reader.where if not _in_layers(k, p) and not k.endswith("_scale_inv")]
        extra = [k for k in self.reader.where if _in_layers(k, p) and int(k[len(p):].split(".")[0]) >= n]
        for key in tqdm(rest, desc="other tensors", disable=not self.progress, leave=False):
            t = self.reader.tensor(key)
            t = t.to(self.save_dtype) if t.is_floating_point() else t
            # moekit's own form holds the model's names, as its layers do (NemotronH: model., not backbone.)
            self.writer.write({key: t} if self.standard else to_model_names(self.model, {key: t}))
        weight_map = self.writer.close()
        config = self.target.config
        config.dtype = self.save_dtype
        if hasattr(config, "quantization_config"):  # the weights are written dequantized
            del config.quantization_config
        if extra:
            config.num_nextn_predict_layers = 0 if hasattr(config, "num_nextn_predict_layers") else None
        config.save_pretrained(self.out)
        source = " dequantized from FP8" if self.reader.is_fp8 else ""
        print(f"moekit: wrote {len(set(weight_map.values()))} shard(s) in {str(self.save_dtype).replace('torch.', '')}"
              f"{source}", file=sys.stderr)
        for p in self.path.iterdir():
            if p.name in OWN_FILES or p.name.startswith(".") or p.suffix in (".safetensors", ".st") or p.name.endswith(".index.json"):
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, self.out / p.name)

    # ------------------------------------------------------------------------------------------ output head
    @torch.no_grad()
    def nll(self, tokens: torch.Tensor) -> tuple[float, int]:
        """(summed next-token negative log-likelihood, tokens scored) of ``tokens`` from the hidden states after the
        last layer: final norm and head read from the checkpoint, the head applied one batch at a time."""
        norm = arch.final_norm(self.model)
        names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        norm_prefix = _disk_name(self.model, names[id(next(norm.parameters()))]).rsplit(".", 1)[0] + "."
        materialise(norm, self.reader.read(norm_prefix), self.device, self.dtype, "the final norm")
        key = "lm_head.weight" if "lm_head.weight" in self.reader.where else self._embed_key()
        weight = self.reader.tensor(key).to(self.device, self.dtype)
        total, count = 0.0, 0
        for row in range(len(tokens)):  # one sequence at a time: its logits are vocabulary x length floats
            h = norm(self.hidden[row].to(self.device))
            logits = _soft_cap(self.model.config, torch.nn.functional.linear(h, weight)).float()
            target = tokens[row, 1:].to(self.device)
            total += torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum").item()
            count += target.numel()
        norm.to("meta")
        return total, count


def _soft_cap(config, logits: torch.Tensor) -> torch.Tensor:
    """What some families do to the head's output (the quirks of their ``forward``, in one place)."""
    if getattr(config, "logit_scale", None):  # Cohere: multiplied
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):  # Granite: divided
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def materialise(module: torch.nn.Module, state: dict[str, torch.Tensor], device, dtype, what: str) -> None:
    """Give the meta-device ``module`` the tensors ``state`` (exactly its state-dict keys) on ``device``."""
    for key, value in state.items():  # moekit-only buffers (moekit_mean_out ...) exist once they are loaded
        owner, _, leaf = key.rpartition(".")
        if leaf.startswith("moekit_"):
            module.get_submodule(owner).register_buffer(leaf, torch.empty_like(value, device="meta"))
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MoekitError(f"checkpoint does not match the model at {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device=device, dtype=dtype)


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more with its own memory mapping, returned to the system when
    freed. glibc otherwise raises its threshold after the first large free (up to 32 MB): a layer's per-expert
    tensors (3 MB each for Qwen3-30B-A3B) then come from the heap, and the heap does not shrink between layers."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixing it also turns the dynamic adjustment off)


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the system (glibc keeps freed heap memory otherwise, and the
    many expert-sized tensors of each layer would pile up as fragmentation)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _layers_prefix(model) -> str:
    layers = arch.decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    raise MoekitError("cannot find the decoder layers' name; this is a moekit bug")


def _disk_name(model, name: str) -> str:
    """A state-dict name (or a name prefix ending in '.') as the checkpoint spells it: transformers' renamings
    applied the way save_pretrained applies them (NemotronH stores ``model.`` as ``backbone.``)."""
    probe = name + "0" if name.endswith(".") else name
    disk = next(iter(to_checkpoint_names(model, {probe: torch.empty(0, device="meta")})))
    return disk[:-1] if name.endswith(".") else disk


def _in_layers(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()


def _save_dtype(reader) -> torch.dtype:
    """The float dtype most of the checkpoint's tensors are stored in; bfloat16 for FP8 checkpoints (written
    dequantized)."""
    from collections import Counter

    from moekit.checkpoint.safetensors_io import DTYPES

    if reader.is_fp8:
        return torch.bfloat16
    counts = Counter(info.dtype for _, info, _ in reader.where.values() if info.dtype in ("BF16", "F16", "F32", "F64"))
    return DTYPES[counts.most_common(1)[0][0]] if counts else torch.bfloat16


def record_calls(model, layers, input_ids: torch.Tensor) -> dict[int, tuple]:
    """Run the model's own forward on ``input_ids`` with its decoder ``layers`` stubbed out; per layer index, the
    (hidden states, args, kwargs) it was called with (attention mask, rotary embeddings, positions ...)."""
    body = getattr(model, "model", model)
    calls: dict = {}
    with _stubbed(layers, calls):
        try:
            body(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
        except (TypeError, ValueError) as e:  # the model wanted more than hidden states from a layer
            raise MoekitError(
                f"{model.config.model_type}'s decoder layers hand each other more than the hidden states "
                f"({type(e).__name__}: {e}); moekit cannot walk it layer by layer: use the one-pass path "
                "(--mode memory, no --propagate)") from None
    return calls


class _stubbed:
    """Decoder layers replaced by stubs that record their inputs; the last one stops the forward pass."""

    def __init__(self, layers, calls: dict):
        self.layers, self.calls = layers, calls

    def __enter__(self):
        last = len(self.layers) - 1
        for j, dl in enumerate(self.layers):
            def stub(hidden_states, *args, j=j, **kwargs):
                self.calls.setdefault(j, (hidden_states, args, kwargs))
                if j == last:
                    raise StopForward
                return hidden_states

            dl.forward = stub

    def __exit__(self, *exc):
        for dl in self.layers:
            del dl.forward
