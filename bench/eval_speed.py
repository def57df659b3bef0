"""Shared-context scoring against the harness's own request path, side by side in one process.

    PYTHONPATH=$PWD python bench/eval_speed.py --model smollm2 --task arc_easy --limit 100

Both runs go through ``moekit.evaluate.evaluate`` (the harness's tasks and metrics, the same HFLM wrapper);
only ``reuse_context`` differs. Prints accuracy and seconds for each and the speed-up; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "dev"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_speed.json"))
    args = ap.parse_args()

    import torch

    from moekit.eval.harness import evaluate
    from moekit.checkpoint.load import load_model

    model, tok = load_model(args.model, dtype="float32", device="cpu")
    evaluate(model, tok, tasks=[args.task], data_dir=args.data_dir, limit=2)  # warm-up: task index, allocator
    rows = []
    for reuse in (True, False):
        r = evaluate(model, tok, tasks=[args.task], data_dir=args.data_dir, limit=args.limit,
                     batch_size=args.batch_size, reuse_context=reuse)
        t = r["tasks"][args.task]
        rows.append({"path": "shared contexts (moekit)" if reuse else "harness HFLM path", "acc": t["acc"],
                     "acc_norm": t["acc_norm"], "seconds": r["seconds"]})
    print(f"\n{args.model} on {args.task} (local, first {args.limit} items), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'path':28s} {'acc':>8s} {'acc_norm':>9s} {'seconds':>8s}")
    for row in rows:
        print(f"{row['path']:28s} {row['acc']:8.4f} {row['acc_norm']:9.4f} {row['seconds']:8.1f}")
    print(f"speed-up: x{rows[1]['seconds'] / rows[0]['seconds']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
