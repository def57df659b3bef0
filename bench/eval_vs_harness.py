"""moekit's in-process evaluation against the harness's own command line, on the same local items.

    PYTHONPATH=$PWD python bench/eval_vs_harness.py --model smollm2 --task arc_easy --limit 300

Runs (1) ``moekit.eval.harness.evaluate`` in process (context-reuse scoring) and (2) ``lm_eval --model hf`` as a
subprocess on the converted checkpoint directory with moekit's offline task config, and prints both accuracies
and wall times. Writes the two result files under ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, add_common, load, parse, parser, tasks_dir, write_json


def main() -> None:
    ap = add_common(parser(__doc__), model="smollm2", limit=300, out=RESULTS / "eval_vs_harness", calib=False, dev=False)
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--only", choices=("moekit", "harness"), help="run one side (e.g. the two sides in parallel)")
    args = parse(ap)
    data_dir = tasks_dir(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from moekit.eval.harness import evaluate, write_result
    from moekit.checkpoint.smollm2 import smollm2_path

    rows = []
    if args.only != "harness":
        model, tok = load(args.model)
        t0 = time.perf_counter()
        ours = evaluate(model, tok, tasks=[args.task], data_dir=data_dir, limit=args.limit,
                        batch_size=args.batch_size, model_name=args.model)
        t_ours = time.perf_counter() - t0
        write_result(ours, out / "moekit.json")
        rows.append(("moekit (in process, shared contexts)", ours["tasks"][args.task]["acc"],
                     ours["tasks"][args.task]["acc_norm"], t_ours))

    if args.only != "moekit":
        path = smollm2_path() if args.model == "smollm2" else Path(args.model)
        cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={path},dtype=float32", "--device", "cpu",
               "--tasks", f"{args.task}_local", "--include_path", str(ROOT / "moekit" / "eval" / "tasks"),
               "--metadata", json.dumps({"moekit_data_dir": str(data_dir.resolve())}),
               "--limit", str(args.limit), "--batch_size", str(args.batch_size), "--output_path", str(out / "harness")]
        print("$", " ".join(cmd), file=sys.stderr)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        t_harness = time.perf_counter() - t0
        found = sorted((out / "harness").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        res = json.loads(found[-1].read_text())["results"][args.task]
        rows.append(("lm_eval CLI (--model hf, checkpoint dir)", res["acc,none"], res["acc_norm,none"], t_harness))

    print(f"\n{args.model} on {args.task} (local file, first {args.limit} items), {torch.get_num_threads()} threads")
    print(f"{'path':42s} {'acc':>8s} {'acc_norm':>9s} {'seconds':>8s}")
    for name, acc, accn, sec in rows:
        print(f"{name:42s} {acc:8.4f} {accn:9.4f} {sec:8.1f}")
    keys = ("path", "acc", "acc_norm", "seconds")
    summary = [dict(zip(keys, r, strict=True)) for r in rows]
    write_json(out / f"summary_{args.only or 'both'}.json", summary)


if __name__ == "__main__":
    main()
