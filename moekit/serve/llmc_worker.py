"""Quantize a checkpoint with llm-compressor, run by the llm-compressor environment's own Python.

Executed as a script (``python llmc_worker.py REQUEST.json RESPONSE.json``) by :mod:`moekit.serve.quantize`,
never imported by moekit: llm-compressor pins its own transformers (0.14: transformers <= 5.17), so it lives in a
separate virtual environment and this script needs nothing but llm-compressor and the standard library.

REQUEST:  {"model": DIR, "out": DIR, "scheme": "W8A8", "ignore": [names or "re:" patterns], "dtype": "auto"}
RESPONSE: {"llmcompressor": version, "compressed_tensors": version, "transformers": version, "seconds": s,
           "quantized_modules": n, "format": quantization format written}  or  {"error": "one line"}

The scheme is one of llm-compressor's preset names (W8A8, FP8_DYNAMIC, W4A16, ...), applied data-free
(round-to-nearest weights; activation scales, where the scheme has them, computed per token at run time) by
``QuantizationModifier`` to every ``Linear`` not ignored. The compressed checkpoint is written with
``save_compressed=True``: the compressed-tensors format vLLM reads.
"""

import json
import sys
import time


def quantize(req: dict) -> dict:
    import importlib.metadata as md

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=req.get("dtype", "auto"))
    recipe = QuantizationModifier(targets="Linear", scheme=req["scheme"], ignore=req["ignore"])
    oneshot(model=model, recipe=recipe)
    quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    model.save_pretrained(req["out"], save_compressed=True)
    try:
        AutoTokenizer.from_pretrained(req["model"]).save_pretrained(req["out"])
    except Exception:  # a checkpoint without a tokenizer stays without one
        pass
    with open(f"{req['out']}/config.json") as f:
        qcfg = json.load(f).get("quantization_config") or {}
    return {"llmcompressor": md.version("llmcompressor"), "compressed_tensors": md.version("compressed-tensors"),
            "transformers": md.version("transformers"), "seconds": time.perf_counter() - start,
            "quantized_modules": quantized, "format": qcfg.get("format", "")}


def main(request_path: str, response_path: str) -> int:
    with open(request_path) as f:
        req = json.load(f)
    try:
        response = quantize(req)
    except Exception as e:  # reported by the caller as one line
        response = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
    with open(response_path, "w") as f:
        json.dump(response, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
