"""Greedy generation in vLLM's offline engine, run by the vLLM environment's own Python.

This file is executed as a script (``python vllm_worker.py REQUEST.json RESPONSE.json``) by
:mod:`moekit.serve.check`, never imported by moekit: vLLM pins its own torch and transformers, so it lives in
a separate virtual environment, and this script needs nothing but vLLM and the standard library.

REQUEST: {"checks": [{"model": DIR, "prompts": [[token ids], ...], "max_tokens": N, "logprobs": K,
                      "dtype": "float32", "max_model_len": L, "engine": {more keyword arguments for vllm.LLM}}, ...]}
RESPONSE: {"results": [{"vllm_version", "load_seconds", "generate_seconds",
                        "outputs": [{"tokens": [...], "logprobs": [{token id: logprob}, ...]}, ...]}
                       or {"error": "one line"}, ...]}
          or {"error": "one line"} when vLLM itself does not import
"""

import json
import math
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


if __name__ == "__main__":  # vLLM's engine spawns processes: the guard keeps them from re-running this
    sys.exit(main(sys.argv[1], sys.argv[2]))
