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

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.checkpoint.forms import repair_for_engines
from moekit.checkpoint.paths import NON_UNIFORM_WEIGHTS, non_uniform_weights
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
    with staged_dir(out, overwrite) as tmp:
        _write(model, tokenizer, tmp)
        if verify:
            try:
                verify_checkpoint(model, tokenizer, tmp, atol=atol)
            except MoekitError as e:  # name the target, not the temporary directory that is about to go
                raise MoekitError(f"'{out}' was not written: the checkpoint did not verify ({str(e).replace(str(tmp), str(out))}); "
                                  "nothing was changed; this is a moekit bug, please report it") from None
    return Path(out).expanduser()


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside ``out`` to fill; on a clean exit it takes ``out``'s place in one rename (an
    existing ``out`` only with ``overwrite``), with the modes the user's umask asks for. On any exception, or a
    kill, ``out`` is untouched; what a killed writer left is removed by the next writer of the same target."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / WRITER_FILE).write_text(str(os.getpid()))
        yield tmp
        (tmp / WRITER_FILE).unlink()
        apply_umask(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


WRITER_FILE = ".moekit-writer"  # pid of the process writing a temporary directory; removed before the rename


def remove_stale_temporaries(out: Path) -> None:
    """Remove what a killed save of the same target left (``.NAME.tmp-*``), saying so in one line. A temporary
    whose writer process is still alive is left alone."""
    import os
    import sys

    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int((leftover / WRITER_FILE).read_text())
            os.kill(pid, 0)
            continue  # its writer is still running
        except (OSError, ValueError):
            pass
        size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file())
        shutil.rmtree(leftover, ignore_errors=True)
        print(f"moekit: removed {leftover.name} ({size / 2**20:.0f} MiB), left by an interrupted save of '{out}'",
              file=sys.stderr)


def apply_umask(root: Path) -> None:
    """``mkdtemp`` creates 0700 directories: give the output the modes the user's umask asks for, so that a
    serving container running as another user can read it."""
    mask = os.umask(0)
    os.umask(mask)
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


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
        save_file(untied_state_dict(model), str(path / NON_UNIFORM_WEIGHTS), metadata={"format": "pt", "moekit": "non-uniform"})
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
