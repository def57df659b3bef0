"""Shared-context scoring against the harness's own request path, side by side in one process.

    PYTHONPATH=$PWD python bench/eval_speed.py --model smollm2 --task arc_easy --limit 100

Both runs go through ``moekit.eval.harness.evaluate`` (the harness's tasks and metrics, the same HFLM wrapper);
only ``reuse_context`` differs. Prints accuracy and seconds for each and the speed-up; writes JSON to --out.
"""

from __future__ import annotations

from common import RESULTS, add_common, load, parse, parser, tasks_dir, write_json


def main() -> None:
    ap = add_common(parser(__doc__), model="smollm2", limit=100, out=RESULTS / "eval_speed.json",
                    out_help="JSON results file", calib=False, dev=False)
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--batch-size", type=int, default=16)
    args = parse(ap)
    data_dir = tasks_dir(args)

    import torch

    from moekit.eval.harness import evaluate

    model, tok = load(args.model)
    evaluate(model, tok, tasks=[args.task], data_dir=data_dir, limit=2)  # warm-up: task index, allocator
    rows = []
    for reuse in (True, False):
        r = evaluate(model, tok, tasks=[args.task], data_dir=data_dir, limit=args.limit,
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
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
