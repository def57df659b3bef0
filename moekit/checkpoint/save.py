"""Saving checkpoints: atomic, self-verifying, standard whenever the model allows it.

* Same expert count and top-k in every layer -> ``save_pretrained`` form that plain
  ``AutoModelForCausalLM.from_pretrained`` loads (and so vLLM / SGLang serve).
* Differing counts per layer -> moekit's opt-in form: the config records the per-layer counts and the
  weights go to ``moekit-model.safetensors`` (a name plain transformers will not pick up by mistake);
  :func:`moekit.load_model` rebuilds it. vLLM does not serve this form as-is: make it uniform first.

Every save writes into a temporary directory next to the target, reloads it, checks that no key is
missing or unexpected and that logits on a few prompts match the in-memory model, and only then renames
it into place. An existing non-empty directory is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from moekit.core import arch
from moekit.core.keys import PER_LAYER_EXPERTS_KEY
from moekit.errors import MoekitError
from moekit.checkpoint.paths import NON_UNIFORM_WEIGHTS
from moekit.checkpoint.read import read_dir

VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Mixture-of-experts models route each token to",
)


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty existing output before any work starts."""
    out = Path(out).expanduser()
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise MoekitError(f"output '{out}' already exists and is not empty: choose another path or pass --overwrite")
    return out


def save_model(model, tokenizer, out: str | Path, *, overwrite: bool = False, verify: bool = True,
               atol: float = 1e-4) -> Path:
    """Save ``model`` (and tokenizer, generation config) atomically to ``out``; verify by reloading."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(model, tokenizer, tmp)
        if verify:
            verify_checkpoint(model, tokenizer, tmp, atol=atol)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(model, tokenizer, path: Path) -> None:
    from safetensors.torch import save_model as st_save_model

    arch.sync_config(model)
    if not (hasattr(model.config, PER_LAYER_EXPERTS_KEY) or arch.moekit_tensors(model)):
        model.save_pretrained(path, safe_serialization=True)
    else:
        model.config.save_pretrained(path)
        st_save_model(model, str(path / NON_UNIFORM_WEIGHTS), metadata={"format": "pt", "moekit": "non-uniform"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def verify_checkpoint(model, tokenizer, path: Path, atol: float = 1e-4) -> None:
    """Reload ``path`` and compare keys and logits with the in-memory ``model``."""
    if not (path / NON_UNIFORM_WEIGHTS).exists():
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


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
