"""Greedy generation in vLLM's offline engine, run by the vLLM environment's own Python.

This file is executed as a script (``python vllm_worker.py REQUEST.json RESPONSE.json``) by
:mod:`moekit.serve.check`: vLLM pins its own torch and transformers, so it lives in a separate virtual environment,
and this script needs nothing but vLLM and the standard library. moekit imports only :func:`leave` from it (the
other vLLM entry point, :mod:`moekit.eval.vllm_entry`, ends the same way).

REQUEST: {"checks": [{"model": DIR, "prompts": [[token ids], ...], "max_tokens": N, "logprobs": K,
                      "dtype": "float32", "max_model_len": L, "engine": {more keyword arguments for vllm.LLM}}, ...]}
RESPONSE: {"results": [{"vllm_version", "load_seconds", "generate_seconds",
                        "outputs": [{"tokens": [...], "logprobs": [{token id: logprob}, ...]}, ...]}
                       or {"error": "one line"}, ...]}
          or {"error": "one line"} when vLLM itself does not import

A check with ``"windows": [[token ids], ...]`` scores them instead (perplexity): {"nll": summed negative
log-likelihood of every token after each window's first, "tokens": how many}.

A check with ``"speed": {"batches": [1, 16], "prompt_len": P, "decode_tokens": D, "repeats": R, "vocab": V}``
measures throughput instead: per batch size, the median over R of prefill tokens/s (B prompts of P tokens, one
generated token) and decode tokens/s (B x D generated tokens over the time beyond that prefill).
"""

import json
import math
import os
import sys
import time


def check(req: dict) -> dict:
    """Load one checkpoint in a fresh engine, generate greedily, shut the engine down."""
    import gc

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = {"dtype": req.get("dtype", "auto"), "seed": 0, "enforce_eager": True,
              "max_model_len": req.get("max_model_len", 1024), **req.get("engine", {})}
    llm = None
    try:
        start = time.perf_counter()
        llm = LLM(model=req["model"], skip_tokenizer_init=True, **engine)
        load_s = time.perf_counter() - start
        if "speed" in req:
            return {"vllm_version": vllm.__version__, "load_seconds": load_s, "speed": speed(llm, req["speed"])}
        if "windows" in req:
            return {"vllm_version": vllm.__version__, "load_seconds": load_s, **prompt_nll(llm, req["windows"])}
        params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], logprobs=req.get("logprobs", 1),
                                ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, use_tqdm=False)
        gen_s = time.perf_counter() - start
        outputs = []
        for r in results:
            out = r.outputs[0]
            steps = [{str(t): (lp.logprob if math.isfinite(lp.logprob) else str(lp.logprob)) for t, lp in step.items()}
                     for step in out.logprobs or []]
            outputs.append({"tokens": list(out.token_ids), "logprobs": steps})
        return {"vllm_version": vllm.__version__, "outputs": outputs, "load_seconds": load_s, "generate_seconds": gen_s}
    except Exception as e:  # reported by the caller as one line
        return {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
    finally:
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
        gc.collect()


def prompt_nll(llm, windows: list[list[int]]) -> dict:
    """Summed negative log-likelihood of every token of each window after its first (vLLM's prompt logprobs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    start = time.perf_counter()
    results = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for window, r in zip(windows, results, strict=True):
        for token, step in zip(window[1:], r.prompt_logprobs[1:], strict=True):
            nll -= step[token].logprob
            count += 1
    return {"nll": nll, "tokens": count, "score_seconds": time.perf_counter() - start}


def speed(llm, spec: dict) -> dict:
    """Prefill and decode throughput per batch size (see the module doc)."""
    import random
    import statistics

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(0)
    out = {}
    for batch in spec["batches"]:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, spec["vocab"]) for _ in range(spec["prompt_len"])])
                   for _ in range(batch)]

        def timed(n_tokens: int, prompts=prompts) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True, detokenize=False)
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        timed(2)  # warm-up
        prefill, decode = [], []
        for _ in range(spec["repeats"]):
            t1 = timed(1)
            td = timed(spec["decode_tokens"] + 1)
            prefill.append(batch * spec["prompt_len"] / t1)
            decode.append(batch * spec["decode_tokens"] / max(td - t1, 1e-9))
        out[str(batch)] = {"prefill_tokens_per_s": statistics.median(prefill),
                           "decode_tokens_per_s": statistics.median(decode)}
    return out


def main(request_path: str, response_path: str) -> int:
    with open(request_path) as f:
        req = json.load(f)
    try:
        import vllm  # noqa: F401
    except Exception as e:
        response = {"error": f"vLLM does not import: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
    else:
        response = {"results": [check(c) for c in req["checks"]]}
    with open(response_path, "w") as f:
        json.dump(response, f)
    return 0


def leave(code: int, timeout_s: float = 10.0) -> None:
    """End a vLLM worker once its response is written. Its child processes (vLLM's engine core where an engine was
    not shut down, multiprocessing's resource tracker) are stopped first -- SIGTERM, then SIGKILL after
    ``timeout_s`` -- or they would outlive it, holding memory; then the worker exits without the interpreter's
    teardown, which vLLM's engine threads can abort ("terminate called without an active exception", exit -6)."""
    try:
        import psutil  # a vLLM dependency
    except ImportError:
        import multiprocessing

        children = multiprocessing.active_children()
        for c in children:
            c.terminate()
        for c in children:
            c.join(timeout_s)
    else:
        children = psutil.Process().children(recursive=True)
        for c in children:
            try:
                c.terminate()
            except psutil.Error:
                pass
        for c in psutil.wait_procs(children, timeout=timeout_s)[1]:
            try:
                c.kill()
            except psutil.Error:
                pass
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # vLLM's engine spawns processes: the guard keeps them from re-running this
    leave(main(sys.argv[1], sys.argv[2]))
