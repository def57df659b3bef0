"""``moekit serve-check``: does vLLM run the checkpoint that transformers runs?

1. The checkpoint's form (:func:`moekit.checkpoint.forms.checkpoint_form`) must be one vLLM can serve; if not,
   the check refuses and names the command that makes it servable.
2. vLLM's offline engine, in its own environment (:mod:`moekit.serve.vllm_env`), generates greedily on fixed
   prompts (default 4 prompts x 32 tokens) and returns each step's chosen token and log-probability
   (:mod:`moekit.serve.vllm_worker`). One engine process checks any number of checkpoints in turn.
3. transformers (plain ``AutoModelForCausalLM``, the model a user of the checkpoint gets) scores vLLM's
   sequences teacher-forced. A step passes when both log-probabilities are finite, agree within ``atol``,
   and vLLM's token is transformers' greedy choice up to ``atol`` (a near-tie may go either way without
   being a fault). The check also counts how many tokens of transformers' own greedy generation vLLM
   reproduced, which is the figure a user sees.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moekit.checkpoint.forms import checkpoint_form
from moekit.errors import MoekitError
from moekit.serve.envs import run_worker
from moekit.serve.vllm_env import find_vllm_python

WORKER = Path(__file__).with_name("vllm_worker.py")
PROMPTS = (
    "The capital of France is",
    "In a distant galaxy, a small robot",
    "def fibonacci(n):\n    ",
    "The three most important inventions of the twentieth century are",
)


@dataclass
class ServeCheckConfig:
    max_tokens: int = 32  # generated tokens per prompt
    prompts: int = 4  # how many of the fixed prompts
    atol: float = 0.02  # log-probability tolerance (fp32 on both sides)
    dtype: str = "float32"  # the dtype both engines run in
    gpu_memory_utilization: float = 0.15  # on CPU: the share of RAM vLLM reserves for its KV cache
    max_model_len: int = 1024
    engine_args: dict = field(default_factory=dict)  # more keyword arguments for vllm.LLM (tensor_parallel_size, ...)
    timeout_s: int = 1800  # for the whole vLLM process
    check_form: bool = True  # refuse forms vLLM cannot serve before running it (off: run and compare anyway)

    def validate(self) -> None:
        if not 1 <= self.prompts <= len(PROMPTS):
            raise MoekitError(f"prompts {self.prompts} must be between 1 and {len(PROMPTS)}")
        if self.max_tokens < 1:
            raise MoekitError(f"max_tokens {self.max_tokens} must be at least 1")
        if not self.atol > 0:
            raise MoekitError(f"atol {self.atol} must be > 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise MoekitError(f"dtype '{self.dtype}' is not one of float32, bfloat16, float16")


@dataclass
class ServeVerdict:
    path: str
    ok: bool
    form: str
    reason: str = ""
    steps: int = 0  # generated tokens compared
    greedy_match: int = 0  # of transformers' own greedy tokens, how many vLLM generated identically
    max_logprob_diff: float = float("nan")
    near_ties: int = 0  # steps where vLLM's token was not transformers' argmax but within atol of it
    vllm_version: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        if not self.ok:
            return f"serve-check {self.path}: FAIL: {self.reason}"
        return (f"serve-check {self.path}: OK in vLLM {self.vllm_version}: {self.greedy_match}/{self.steps} greedy tokens "
                f"identical to transformers, max |Δ logprob| {self.max_logprob_diff:.2g}"
                + (f", {self.near_ties} near-ties" if self.near_ties else ""))


def prompt_ids(path: Path, n: int, vocab_size: int) -> list[list[int]]:
    """The fixed prompts as token ids: through the checkpoint's tokenizer, or seeded ids when it has none."""
    from moekit.checkpoint.read import read_tokenizer

    tok = read_tokenizer(path)
    if tok is not None:
        return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:n]]
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (6 + i,), generator=gen).tolist() for i in range(n)]


def run_vllm(requests: list[dict], python: Path, timeout_s: int) -> list[dict]:
    """Run the worker once over ``requests`` (one per checkpoint); one response each."""
    out = run_worker([str(python), str(WORKER)], {"checks": requests}, timeout_s=timeout_s, what="the vLLM process",
                     hint="; raise --timeout or check the vLLM environment")
    if "error" in out:
        raise MoekitError(f"vLLM failed before generating: {out['error']}")
    return out["results"]


def _finite(x) -> float:
    return float(x) if isinstance(x, int | float) else float("nan")


@torch.no_grad()
def compare(path: Path, prompts: list[list[int]], response: dict, cfg: ServeCheckConfig) -> ServeVerdict:
    """Teacher-forced comparison of vLLM's generations with plain transformers on the same checkpoint."""
    from transformers import AutoModelForCausalLM

    verdict = ServeVerdict(str(path), False, "standard", vllm_version=response.get("vllm_version", ""))
    if "error" in response:
        verdict.reason = f"vLLM could not run it: {response['error']}"
        return verdict
    dtype = getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).eval()
    worst, steps, ties, greedy_match = 0.0, 0, 0, 0
    problems = []
    for p, (prompt, out) in enumerate(zip(prompts, response["outputs"], strict=True)):
        gen = out["tokens"]
        seq = torch.tensor([prompt + gen])
        logp = torch.log_softmax(model(seq).logits[0].float(), -1)
        hf_greedy = model.generate(torch.tensor([prompt]), max_new_tokens=len(gen), do_sample=False,
                                   attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   pad_token_id=0)[0, len(prompt):].tolist()
        greedy_match += next((i for i, (a, b) in enumerate(zip(hf_greedy, gen, strict=False)) if a != b), len(gen))
        for t, tok in enumerate(gen):
            steps += 1
            row = logp[len(prompt) + t - 1]
            v = _finite(out["logprobs"][t].get(str(tok)))
            h = float(row[tok])
            best = float(row.max())
            if not (math.isfinite(v) and math.isfinite(h)):
                problems.append(f"prompt {p} token {t}: non-finite log-probability (vLLM {out['logprobs'][t].get(str(tok))}, "
                                f"transformers {h:.3g})")
                break
            worst = max(worst, abs(v - h))
            if abs(v - h) > cfg.atol:
                problems.append(f"prompt {p} token {t}: log-probability {v:.4f} in vLLM, {h:.4f} in transformers")
                break
            if best - h > cfg.atol:
                problems.append(f"prompt {p} token {t}: vLLM chose token {tok}, {best - h:.3f} below transformers' best")
                break
            ties += int(int(row.argmax()) != tok)
    verdict.steps, verdict.greedy_match, verdict.near_ties, verdict.max_logprob_diff = steps, greedy_match, ties, worst
    verdict.ok = not problems
    verdict.reason = problems[0] if problems else ""
    return verdict


def serve_check(paths: list[str | Path], cfg: ServeCheckConfig | None = None, *, vllm_python: str | Path | None = None
                ) -> list[ServeVerdict]:
    """Check every checkpoint in ``paths`` in one vLLM process; refused forms are not run."""
    cfg = cfg or ServeCheckConfig()
    cfg.validate()
    start = time.perf_counter()
    verdicts: dict[int, ServeVerdict] = {}
    runnable: list[tuple[int, Path, list[list[int]]]] = []
    for i, p in enumerate(paths):
        path = Path(p)
        form = checkpoint_form(path)
        if not form.servable and (cfg.check_form or form.name != "standard"):
            verdicts[i] = ServeVerdict(str(path), False, form.name, reason=f"{form.reason}; {form.fix}")
            continue
        config = json.loads((path / "config.json").read_text())
        vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size", 0))
        runnable.append((i, path, prompt_ids(path, cfg.prompts, vocab)))
    if runnable:
        python = find_vllm_python(vllm_python)
        engine = {"gpu_memory_utilization": cfg.gpu_memory_utilization, **cfg.engine_args}
        requests = [{"model": str(path.resolve()), "prompts": prompts, "max_tokens": cfg.max_tokens, "logprobs": 1,
                     "dtype": cfg.dtype, "max_model_len": cfg.max_model_len, "engine": engine}
                    for _, path, prompts in runnable]
        responses = run_vllm(requests, python, cfg.timeout_s)
        for (i, path, prompts), response in zip(runnable, responses, strict=True):
            verdicts[i] = compare(path, prompts, response, cfg)
    seconds = time.perf_counter() - start
    for v in verdicts.values():
        v.seconds = seconds
    return [verdicts[i] for i in range(len(paths))]


def verdict_dict(v: ServeVerdict) -> dict:
    d = asdict(v)
    d["max_logprob_diff"] = None if math.isnan(v.max_logprob_diff) else v.max_logprob_diff
    return d


if __name__ == "__main__":  # `python -m moekit.serve.check DIR...`: the same as `moekit serve-check`
    for verdict in serve_check(sys.argv[1:]):
        print(verdict.line())
