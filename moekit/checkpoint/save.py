"""Saving checkpoints: atomic, self-verifying, standard whenever the model allows it, in shards of at most 5 GB.

* Same expert count and top-k in every layer -> transformers' form (``model-00001-of-0000N.safetensors`` and
  ``model.safetensors.index.json``, per-expert names as ``save_pretrained`` writes them) that plain
  ``AutoModelForCausalLM.from_pretrained`` loads (and so vLLM / SGLang serve).
* Differing counts or top-k per layer, a moekit routing rule or moekit-only tensors -> moekit's opt-in form:
  the config records what moekit needs and the weights go to ``moekit-model.st`` (or ``moekit-model-00001-of-0000N.st``
  and ``moekit-model.st.index.json``: safetensors content under names plain transformers will not pick up by mistake,
  so it cannot run a different model silently); :func:`moekit.load_model` rebuilds it. vLLM does not serve this
  form as-is: make it uniform first.

The weights are written one decoder layer at a time (:class:`~moekit.checkpoint.shard_writer.ShardWriter`), so
no second copy of the model is made: only one layer's per-expert tensors exist at once. Every save writes into a
temporary directory next to the target, then reads every tensor back and compares it bit for bit with the model's,
checks that no key is missing or unexpected against the model its saved config describes, and -- only when memory
holds the model twice -- reloads it and compares logits on a few prompts; only then is it renamed into place. An
existing non-empty directory is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import torch

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.checkpoint.forms import repair_for_engines
from moekit.checkpoint.paths import NON_UNIFORM_PREFIX, NON_UNIFORM_SUFFIX, non_uniform_weights
from moekit.checkpoint.read import empty_model, read_dir
from moekit.checkpoint.safetensors_io import CheckpointReader
from moekit.checkpoint.shard_writer import DEFAULT_SHARD_BYTES, ShardWriter
from moekit.outputs import staged_dir

log = logging.getLogger("moekit")

VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Mixture-of-experts models route each token to",
)
# the logits check reloads the model: it runs when free memory holds the model's size again, with this margin
RELOAD_MARGIN = 1.25


def save_model(model, tokenizer, out: str | Path, *, overwrite: bool = False, verify: bool = True,
               atol: float = 1e-4, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Save ``model`` (and tokenizer, generation config) atomically to ``out`` in shards of at most
    ``max_shard_bytes``; verify it tensor by tensor (and by its logits when memory allows)."""
    with staged_dir(out, overwrite) as tmp:
        _write(model, tokenizer, tmp, max_shard_bytes, check_parts=not verify)
        if verify:
            try:
                verify_checkpoint(model, tokenizer, tmp, atol=atol)
            except MoekitError as e:  # name the target, not the temporary directory that is about to go
                raise MoekitError(f"'{out}' was not written: the checkpoint did not verify ({str(e).replace(str(tmp), str(out))}); "
                                  "nothing was changed; this is a moekit bug, please report it") from None
    return Path(out).expanduser()


def is_standard(model) -> bool:
    """Whether plain transformers, loading the saved model, runs what moekit runs: the same expert count and
    top-k in every layer, no moekit routing rule, no moekit-only tensor. Anything else is written in moekit's
    form, which plain transformers and vLLM cannot load by mistake."""
    return arch.is_uniform(model) and not arch.moekit_tensors(model)


def _write(model, tokenizer, path: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, check_parts: bool = True) -> None:
    """Write the checkpoint into ``path``. ``check_parts``: have the writer read each part back at once (not
    needed when :func:`verify_checkpoint` reads the finished shards back)."""
    arch.sync_config(model)
    repair_for_engines(model, source="the model being saved")  # every engine then reads it the same way
    standard = is_standard(model)
    names = dict(prefix="model", suffix=".safetensors") if standard else \
        dict(prefix=NON_UNIFORM_PREFIX, suffix=NON_UNIFORM_SUFFIX, metadata={"moekit": "non-uniform"})
    writer = ShardWriter(path, max_shard_bytes=max_shard_bytes, verify=check_parts, **names)
    for group in stored_groups(model, standard):
        writer.write(group)
    writer.close()
    model.config.dtype = str(model.dtype).split(".")[1]  # what save_pretrained records
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    if model.is_remote_code():  # as save_pretrained does: the modeling code beside the config
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, path, config=model.config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def stored_groups(model, standard: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors a checkpoint of ``model`` stores, under their stored names, one decoder layer at a time (what
    lies outside the layers is one group too). Tied tensors appear once (transformers' choice of name: the
    embedding table, not the head). ``standard``: transformers' on-disk names, per-expert tensors as
    ``save_pretrained`` writes them, made one layer at a time (they are copies); else the model's own names.
    Weights a device map offloaded are read back one layer at a time too."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.integrations.accelerate import load_offloaded_parameter
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    placed = getattr(model, "hf_device_map", None) is not None  # offloaded weights wait on the meta device
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in remove_tied_weights_from_state_dict(state, model).items():
        layer = re.match(r"(.*?\.layers\.\d+)\.", key)
        groups.setdefault(layer.group(1) if layer else "", {})[key] = t
    for group in groups.values():
        if placed:
            group = {k: load_offloaded_parameter(model, k) if t.is_meta else t for k, t in group.items()}
        yield revert_weight_conversion(model, group) if standard else group


def verify_checkpoint(model, tokenizer, path: Path, atol: float = 1e-4) -> None:
    """Check the checkpoint at ``path`` against the in-memory ``model``: every tensor read back bit for bit, the
    keys against those the saved config's model expects; then, if memory holds the model twice, reload it and
    compare logits."""
    from transformers import AutoConfig

    standard = non_uniform_weights(path) is None
    reader = CheckpointReader(path)
    on_disk = {key: info.shape for key, (_, info, _) in reader.where.items()}
    meant: dict[str, list[int]] = {}
    for group in stored_groups(model, standard):
        for key, t in group.items():
            meant[key] = list(t.shape)
            if key in on_disk and not _same_bits(reader.tensor(key), t):
                raise MoekitError(f"tensor '{key}' read back from '{path}' differs from the in-memory model's")
    skeleton = empty_model(AutoConfig.from_pretrained(path))
    skeleton.tie_weights()  # as loading does
    if getattr(model, "_weight_conversions", None) is not None:  # the names the model was loaded with
        skeleton._weight_conversions = model._weight_conversions
    expected = {key: list(t.shape) for group in stored_groups(skeleton, standard) for key, t in group.items()}
    own = {key: shape for key, shape in on_disk.items() if not key.rpartition(".")[2].startswith("moekit_")}
    bad = _key_differences(meant, on_disk) or _key_differences(expected, own)
    if bad:
        raise MoekitError(f"saved checkpoint does not reload cleanly ({bad}); this is a moekit bug, please report it")

    device = next(model.parameters()).device
    size = sum(t.nbytes for t in chain(model.parameters(), model.buffers()))
    free = available_memory(device)
    if free < RELOAD_MARGIN * size:
        log.warning("moekit: checked the saved checkpoint tensor by tensor; skipped reloading it to compare logits: "
                    "the model (%.1f GiB) does not fit in memory twice (%.1f GiB free)", size / 2**30, free / 2**30)
        return
    reloaded, _ = read_dir(path, model.dtype, False, None)
    reloaded.to(device).eval()
    ids = _verify_ids(tokenizer, model.config.vocab_size, device)
    with torch.no_grad():
        a = model(ids).logits.float()
        b = reloaded(ids).logits.float()
    err = (a - b).abs().max().item()
    if not err <= atol * max(1.0, a.abs().max().item()):
        raise MoekitError(f"saved checkpoint's logits differ from the in-memory model by {err:.3g}; this is a moekit bug")


def available_memory(device: torch.device) -> int:
    """Bytes free for a second copy of a model on ``device``: the system's (the reload reads into it first) and,
    for a GPU, the device's."""
    from moekit.core.device import available_bytes

    free = available_bytes("cpu")
    return min(free, available_bytes(device)) if device.type == "cuda" else free


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.detach().to("cpu").contiguous()
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _key_differences(want: dict[str, list[int]], have: dict[str, list[int]]) -> dict[str, list[str]]:
    bad = {"missing_keys": sorted(want.keys() - have.keys()), "unexpected_keys": sorted(have.keys() - want.keys()),
           "mismatched_keys": sorted(k for k in want.keys() & have.keys() if want[k] != have[k])}
    return {k: v[:5] for k, v in bad.items() if v}


def _verify_ids(tokenizer, vocab_size: int, device) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    rows = [tokenizer(p)["input_ids"][:12] for p in VERIFY_PROMPTS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows], device=device)
