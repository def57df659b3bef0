"""Prune, then quantize: a moekit output through llm-compressor into vLLM, perplexity before and after.

    python bench/prune_quantize.py                    # smollm2-moe; W8A8; experts quantized only if vLLM runs them
    python bench/prune_quantize.py --scheme W8A8 --experts   # on a GPU (or an AMX CPU) quantize the experts too

The chain a user runs, each step a moekit command's function:
1. the REAP-pruned (-25% experts) standard checkpoint of `bench/serve_speed.py` (built once, cached);
2. `moekit quantize` (llm-compressor in its own environment, `moekit llmc-env`), on the original and on the
   pruned checkpoint, writing compressed-tensors checkpoints;
3. one vLLM process (`moekit vllm-env`) scores all four on the same dev windows (`moekit ppl --backend vllm`)
   and times decoding; transformers scores the two unquantized ones in process as a cross-check of the engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import RESULTS, add_common, load, parse, parser, write_json


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main(argv=None) -> None:
    ap = add_common(parser(__doc__))
    ap.add_argument("--scheme", default="W8A8")
    ap.add_argument("--experts", action="store_true", help="quantize the routed experts too (needs a vLLM that runs them)")
    ap.add_argument("--tokens", type=int, default=16384, help="dev tokens scored (1024-token windows)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--llmc-python", default=None)
    args = parse(ap, argv)

    import datetime
    import importlib.metadata as md

    from serve_speed import build_models

    from moekit.eval.perplexity import perplexity, windows
    from moekit.serve.check import run_vllm
    from moekit.serve.quantize import QuantizeConfig, find_llmc_python, quantize
    from moekit.serve.vllm_env import find_vllm_python, vllm_version

    vllm_py, llmc_py = find_vllm_python(args.vllm_python), find_llmc_python(args.llmc_python)
    served = RESULTS / "serve_models"
    base = build_models(args, served)
    models = {"original": base["original"], "pruned -25% (reap)": base["pruned -25% (reap)"]}
    cfg = QuantizeConfig(scheme=args.scheme, experts=args.experts)
    reports = {}
    for name in list(models):
        target = served / f"{models[name].name}-{args.scheme.lower()}{'' if args.experts else '-dense'}"
        if not (target / "config.json").exists():
            reports[name] = quantize(models[name], target, cfg, overwrite=True, llmc_python=llmc_py)
            print(f"{name}: quantized -> {target} ({reports[name]['quantized_modules']} modules)", flush=True)
        models[f"{name} + {args.scheme}"] = target

    model, tok = load(args.model)
    toks = windows(tok, args.dev, max_tokens=args.tokens, window=1024)
    hf = {"original": perplexity(model, toks)}
    pruned, _ = load(str(models["pruned -25% (reap)"]))
    hf["pruned -25% (reap)"] = perplexity(pruned, toks)
    del model, pruned

    spec = {"batches": [16], "prompt_len": 256, "decode_tokens": 32, "repeats": 2, "vocab": int(toks.max()) + 1}
    engine = {"gpu_memory_utilization": 0.15}
    requests = []
    for path in models.values():
        requests.append({"model": str(path.resolve()), "windows": toks.tolist(), "dtype": args.dtype,
                         "max_model_len": 1025, "engine": engine})
        requests.append({"model": str(path.resolve()), "dtype": args.dtype, "max_model_len": 300, "engine": engine,
                         "speed": spec})
    responses = run_vllm(requests, vllm_py, 3600)
    rows, raw = [], {}
    import math

    for i, (name, path) in enumerate(models.items()):
        score, speed = responses[2 * i], responses[2 * i + 1]
        for r in (score, speed):
            if "error" in r:
                sys.exit(f"{name}: {r['error']}")
        ppl = math.exp(score["nll"] / score["tokens"])
        decode = speed["speed"]["16"]["decode_tokens_per_s"]
        raw[name] = {"path": str(path), "vllm_ppl": ppl, "hf_ppl": hf.get(name), "weights_mib": dir_mib(path),
                     "decode_tokens_per_s_b16": decode}
        rows.append([name, f"{dir_mib(path):.0f}", f"{ppl:.2f}", f"{hf[name]:.2f}" if name in hf else "–", f"{decode:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    base_decode = raw["original"]["decode_tokens_per_s_b16"]
    for row, name in zip(rows, models, strict=True):
        row[-1] += f" ({raw[name]['decode_tokens_per_s_b16'] / base_decode:.2f}×)"
    what = "all Linear layers but lm_head and the routers" if args.experts else \
        "attention and shared-expert projections (routed experts stay float32: vLLM 0.32's CPU quantized-MoE kernels need AMX)"
    write_json(RESULTS / "tables" / "prune_quantize.json", {
        "title": f"Prune, then quantize with llm-compressor ({args.scheme}), served by vLLM",
        "command": "python bench/prune_quantize.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": f"{args.model}; quantized: {what}",
        "data": f"first {toks.numel():,} tokens of {Path(args.dev).name} in 1024-token windows; decode: 16 random "
                "256-token prompts x 32 greedy tokens, median of 2",
        "machine": f"2-core development CPU (AVX-512 VNNI, no AMX); vLLM {vllm_version(vllm_py)} (CPU build), "
                   f"llm-compressor {next(iter(reports.values()), {}).get('llmcompressor', '0.14.0.1')}, "
                   f"transformers {md.version('transformers')} in process, {args.dtype}",
        "recorded": datetime.date.today().isoformat(),
        "columns": ["model", "weights MiB", "perplexity in vLLM", "perplexity in transformers", "decode tok/s B=16 in vLLM"],
        "formats": [""] * 5, "rows": rows, "raw": raw, "quantize_reports": reports})


if __name__ == "__main__":  # vLLM's engine spawns processes
    main()
