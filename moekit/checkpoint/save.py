"""Saving checkpoints: atomic, self-verifying, standard whenever the model allows it.

* Same expert count and top-k in every layer -> ``save_pretrained`` form that plain
  ``AutoModelForCausalLM.from_pretrained`` loads (and so vLLM / SGLang serve).
* Differing counts or top-k per layer, a moekit routing rule or moekit-only tensors -> moekit's opt-in form:
  the config records what moekit needs and the weights go to ``moekit-model.st`` (safetensors content under a name plain
  transformers will not pick up by mistake, so it cannot run a different model silently);
  :func:`moekit.load_model` rebuilds it. vLLM does not serve this form as-is: make it uniform first.

Every save writes into a temporary directory next to the target, reloads it, checks that no key is
missing or unexpected and that logits on a few prompts match the in-memory model, and only then renames
it into place. An existing non-empty directory is refused unless ``overwrite=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.checkpoint.forms import repair_for_engines
from moekit.checkpoint.paths import NON_UNIFORM_WEIGHTS, non_uniform_weights
from moekit.checkpoint.read import read_dir
from moekit.outputs import staged_dir

VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Mixture-of-experts models route each token to",
)


def save_model(model, tokenizer, out: str | Path, *, overwrite: bool = False, verify: bool = True,
               atol: float = 1e-4) -> Path:
    """Save ``model`` (and tokenizer, generation config) atomically to ``out``; verify by reloading."""
    with staged_dir(out, overwrite) as tmp:
        _write(model, tokenizer, tmp)
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


def _write(model, tokenizer, path: Path) -> None:
    from safetensors.torch import save_file

    arch.sync_config(model)
    repair_for_engines(model, source="the model being saved")  # every engine then reads it the same way
    if is_standard(model):
        model.save_pretrained(path, safe_serialization=True)
    else:
        model.config.save_pretrained(path)
        save_file(untied_state_dict(model), str(path / NON_UNIFORM_WEIGHTS),  # writes inside a staged_dir
                  metadata={"format": "pt", "moekit": "non-uniform"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def untied_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict with each tensor stored once: of names sharing one tensor (tied embeddings), the first in
    state-dict order stays (``model.embed_tokens.weight`` before ``lm_head.weight``), so that
    :func:`moekit.checkpoint.read.read_non_uniform` finds the source and ties the rest back."""
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        state[key] = tensor.detach().contiguous()
    return state


def verify_checkpoint(model, tokenizer, path: Path, atol: float = 1e-4) -> None:
    """Reload ``path`` and compare keys and logits with the in-memory ``model``."""
    if non_uniform_weights(path) is None:
        from transformers import AutoModelForCausalLM

        _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=model.dtype)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise MoekitError(f"saved checkpoint does not reload cleanly ({bad}); this is a moekit bug, please report it")
    device = next(model.parameters()).device
    reloaded, _ = read_dir(path, model.dtype, False, None)
    reloaded.to(device).eval()
    ids = _verify_ids(tokenizer, model.config.vocab_size, device)
    with torch.no_grad():
        a = model(ids).logits.float()
        b = reloaded(ids).logits.float()
    err = (a - b).abs().max().item()
    if not err <= atol * max(1.0, a.abs().max().item()):
        raise MoekitError(f"saved checkpoint's logits differ from the in-memory model by {err:.3g}; this is a moekit bug")


def _verify_ids(tokenizer, vocab_size: int, device) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    rows = [tokenizer(p)["input_ids"][:12] for p in VERIFY_PROMPTS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows], device=device)
