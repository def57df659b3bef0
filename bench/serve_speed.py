"""Serving speed in vLLM: the original MoE against its compressed forms, measured side by side in one run.

    python bench/serve_speed.py                       # smollm2-moe: original, -25% pruned, top-4 rescale, densified
    python bench/serve_speed.py --rounds 3 --batches 1 16 --prompt-len 256 --decode-tokens 32

Every model is a standard checkpoint written by moekit (cached under bench/results/serve_models/). Each round
starts one vLLM process (the environment of `moekit vllm-env`) that loads the models one after another and
measures prefill tokens/s (B prompts of P random tokens, one generated token) and decode tokens/s (B x D
greedy tokens beyond that prefill), at every batch size B; rounds alternate the model order, and the table
shows each model's median over rounds and its ratio to the original. The HF-eager speed of `moekit eval
--costs` stays a secondary figure; this is the one users see.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

from common import RESULTS, add_common, load, load_or_profile, parse, parser, write_json


def build_models(args, out: Path) -> dict[str, Path]:
    """The four checkpoints, written once (a rerun reuses them)."""
    import torch

    from moekit.checkpoint.save import save_model
    from moekit.data import calibration_tokens
    from moekit.densify.densify import DensifyConfig, densify
    from moekit.prune.prune import PruneConfig, prune_
    from moekit.route.route import RouteConfig, route_

    names = {"original": None, "pruned -25% (reap)": "pruned", "top-4 (rescale)": "top4-rescale",
             "densified (K=8, reap)": "densified"}
    model, tok = load(args.model)
    from moekit.carve.embedded import embedded_moe_path

    paths = {"original": embedded_moe_path() if args.model == "smollm2-moe" else Path(args.model)}
    if all((out / d / "config.json").exists() for d in list(names.values())[1:]):
        return {**paths, **{n: out / d for n, d in names.items() if d}}
    calib = calibration_tokens(args.calib, tok, n_seq=16, seq_len=512)
    stats = load_or_profile(model, calib, RESULTS / "smollm2-moe.stats.safetensors")
    with torch.no_grad():
        m = copy.deepcopy(model)
        prune_(m, PruneConfig(criterion="reap", ratio=0.25), stats=stats)
        save_model(m, tok, out / "pruned", overwrite=True)
        m = copy.deepcopy(model)
        route_(m, RouteConfig(top_k=4, mitigations=("rescale",)), stats=stats, tokens=calib)
        save_model(m, tok, out / "top4-rescale", overwrite=True)
        save_model(densify(model, DensifyConfig(keep=8, score="reap"), stats=stats), tok, out / "densified",
                   overwrite=True)
    return {**paths, **{n: out / d for n, d in names.items() if d}}


def main(argv=None) -> None:
    ap = add_common(parser(__doc__), dev=False)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1, help="timings per model per round")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vllm-python", default=None)
    args = parse(ap, argv)

    from moekit.serve.check import run_vllm
    from moekit.serve.vllm_env import find_vllm_python

    python = find_vllm_python(args.vllm_python)
    models = build_models(args, RESULTS / "serve_models")
    names = list(models)
    vocab = json.loads((models["original"] / "config.json").read_text())["vocab_size"]
    spec = {"batches": args.batches, "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
            "repeats": args.repeats, "vocab": vocab}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate: drift hits every model alike
        requests = [{"model": str(models[n].resolve()), "dtype": args.dtype, "max_model_len": args.prompt_len + args.decode_tokens + 8,
                     "engine": {"gpu_memory_utilization": 0.15}, "speed": spec} for n in order]
        for n, res in zip(order, run_vllm(requests, python, 3600), strict=True):
            if "error" in res:
                sys.exit(f"{n}: {res['error']}")
            runs[n].append(res["speed"])
            print(f"round {r + 1}: {n}: {res['speed']}", flush=True)
    rows, cols = [], ["model"]
    for b in args.batches:
        cols += [f"prefill tok/s (B={b})", "ratio", f"decode tok/s (B={b})", "ratio"]
    med = {n: {b: {k: statistics.median(run[str(b)][k] for run in runs[n]) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
               for b in args.batches} for n in names}
    for n in names:
        row = [n]
        for b in args.batches:
            for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                row += [med[n][b][k], med[n][b][k] / med["original"][b][k]]
        rows.append(row)
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row))
    import datetime

    table_rows = [[r[0], *[f"{r[i]:.1f} ({r[i + 1]:.2f}×)" for i in range(1, len(r), 2)]] for r in rows]
    table_cols = ["model", *[c for c in cols[1:] if c != "ratio"]]
    write_json(RESULTS / "tables" / "serve_speed.json", {
        "title": "Serving speed in vLLM (ratio to the original in brackets)",
        "command": "python bench/serve_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": f"{args.model} and three compressed standard checkpoints of it",
        "data": f"random prompts of {args.prompt_len} tokens, {args.decode_tokens} greedy tokens; median of "
                f"{args.rounds} rounds alternating the model order, one vLLM process per round",
        "machine": f"2-core development CPU, vLLM (CPU build) with one engine thread, {args.dtype}",
        "recorded": datetime.date.today().isoformat(),
        "columns": table_cols, "formats": [""] * len(table_cols), "rows": table_rows, "runs": runs})


if __name__ == "__main__":  # vLLM's engine spawns processes
    main()
