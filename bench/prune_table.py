"""Which pruning criterion loses least: every criterion at 25% and 50% of routed experts removed.

    python bench/prune_table.py [--model smollm2-moe] [--limit 300] [--eval-rows ROWS] [--out bench/results]

For each criterion x ratio x budget (uniform, global), plus the top-k′ threshold rule (tau), on a copy of
the model: parameters, perplexity (first --ppl-tokens tokens of the dev C4 file, --window windows) and,
for the rows chosen by --eval-rows, zero-shot dev-task accuracy (moekit.eval.harness.evaluate, --limit items per task).
Statistics come from moekit.profile.profile on --calib-seqs x --calib-len calibration tokens (saved, reused).
Rows are appended to prune_table.jsonl as they finish; a rerun skips rows already there.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from common import add_common, append_jsonl, dev_tasks, load, load_or_profile, parse, parser, read_jsonl, tasks_dir

CRITERIA = ("frequency", "prob_mass", "weighted_frequency", "reap", "ean", "man", "msan", "aimer", "topk_prime", "random")


def row_name(criterion: str, ratio: float | None, budget: str, k_prime: int | None = None, tau: float = 1.0) -> str:
    if ratio is None:
        return f"threshold top-{k_prime} tau={tau:g}"
    return f"{criterion}{f' (k={k_prime})' if criterion == 'topk_prime' else ''} -{ratio:.0%} {budget}"


def plan_rows(top_k: int, ratios) -> list[dict]:
    """Rows in the order they run: the unpruned model, uniform budgets, global budgets, the threshold rule."""
    rows = [{"name": "unpruned"}]
    k_prime = max(1, top_k // 2)
    for label in ("uniform", "global-median", "global-mean"):
        budget, _, norm = label.partition("-")
        for ratio in ratios:
            for c in CRITERIA:
                rows.append(
                    {
                        "name": row_name(c, ratio, label, k_prime),
                        "criterion": c,
                        "ratio": ratio,
                        "budget": budget,
                        "global_norm": norm or "mean",
                        "top_k_prime": k_prime if c == "topk_prime" else None,
                    }
                )
    # the threshold rule: tau=1 (the default), and tau=100 (on a balanced router tau=1 may keep everything)
    for k, tau in ((top_k, 1.0), (k_prime, 1.0), (1, 1.0), (2, 100.0), (1, 100.0)):
        rows.append(
            {"name": row_name("topk_prime", None, "", k, tau), "criterion": "topk_prime", "top_k_prime": k, "tau": tau}
        )
    return rows


def main() -> None:
    ap = add_common(parser(__doc__), limit=300)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--tasks", default="arc_easy,openbookqa,social_iqa")
    ap.add_argument("--eval-rows", default="all", help="'all', 'none', or comma-separated row names")
    ap.add_argument("--only", default=None, help="run only rows whose name contains one of these (comma-separated)")
    ap.add_argument("--batch-size", type=int, default=4, help="perplexity windows per forward pass")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument(
        "--no-ppl", action="store_true", help="skip the perplexity pass (e.g. a second process doing accuracy)"
    )
    ap.add_argument(
        "--stop-at", default=None, help="UTC HH:MM after which no new row starts (then the table is written)"
    )
    args = parse(ap)
    args.out = Path(args.out)

    from moekit.core import arch
    from moekit.data import calibration_tokens
    from moekit.eval.perplexity import perplexity, windows
    from moekit.prune.prune import PruneConfig, prune_

    args.out.mkdir(parents=True, exist_ok=True)
    tag = Path(args.model).name
    model, tok = load(args.model)
    calib = calibration_tokens(args.calib, tok, n_seq=args.calib_seqs, seq_len=args.calib_len, seed=0)
    stats = load_or_profile(model, calib, args.out / f"{tag}.stats.safetensors")
    ppl_tokens = windows(tok, args.dev, max_tokens=args.ppl_tokens, window=args.window)
    tasks = [t for t in args.tasks.split(",") if t]
    top_k = arch.moe_layers(model)[0].top_k
    rows = plan_rows(top_k, [float(r) for r in args.ratios.split(",")])
    if args.only:
        rows = [r for r in rows if any(s in r["name"] for s in args.only.split(","))]
    table = args.out / f"prune_table.{tag}.jsonl"
    done: dict[str, dict] = {}
    for r in read_jsonl(table):
        done[r["name"]] = {**done.get(r["name"], {}), **r}

    def wants_eval(name: str) -> bool:
        if args.eval_rows == "all":
            return True
        if args.eval_rows == "none":
            return False
        return any(s == name for s in args.eval_rows.split(","))

    def pruned(spec):
        m = copy.deepcopy(model)
        if spec["name"] == "unpruned":
            return m, None
        cfg = PruneConfig(
            criterion=spec["criterion"],
            ratio=spec.get("ratio"),
            top_k_prime=spec.get("top_k_prime"),
            tau=spec.get("tau", 1.0),
            budget=spec.get("budget") or "uniform",
            global_norm=spec.get("global_norm", "mean"),
        )
        return m, prune_(m, cfg, stats=stats)

    def out_of_time() -> bool:
        return bool(args.stop_at) and time.strftime("%H:%M", time.gmtime()) >= args.stop_at

    # pass 1: parameters and perplexity for every row
    for spec in rows:
        name = spec["name"]
        if name in done or out_of_time() or args.no_ppl:
            continue
        rec = {"name": name, **{k: v for k, v in spec.items() if k != "name"}}
        try:
            m, report = pruned(spec)
        except Exception as e:  # a guard (e.g. the threshold rule keeping < top-k) is a result too
            rec["error"] = str(e)
            print(f"{name}: {e}", flush=True)
            append_jsonl(table, rec)
            continue
        rec["experts_per_layer"] = [x.num_experts for x in arch.moe_layers(m)]
        rec["experts"] = sum(rec["experts_per_layer"])
        rec["params"] = arch.param_counts(m)
        if (
            report is not None
            and report["experts_after"] == report["experts_before"]
            and "ppl" in done.get("unpruned", {})
        ):
            rec.update(
                ppl=done["unpruned"]["ppl"], ppl_s=0.0, ppl_tokens=done["unpruned"].get("ppl_tokens"), no_op=True
            )
            print(f"{name}: prunes nothing (experts {rec['experts']}); perplexity of the unpruned model", flush=True)
            append_jsonl(table, rec)
            done[name] = rec
            continue
        t = time.perf_counter()
        rec["ppl"] = perplexity(m, ppl_tokens, batch_size=args.batch_size, progress=False)
        rec["ppl_s"] = round(time.perf_counter() - t, 1)
        rec["ppl_tokens"] = int(ppl_tokens.numel())
        print(
            f"{name}: experts {rec['experts']} params {rec['params']['total']:,} ppl {rec['ppl']:.3f} "
            f"({rec['ppl_s']}s)",
            flush=True,
        )
        append_jsonl(table, rec)
        done[name] = rec
        del m
    # pass 2: dev-task accuracy for the chosen rows
    for spec in rows:
        name = spec["name"]
        if not tasks or not wants_eval(name) or done.get(name, {}).get("tasks") or "error" in done.get(name, {}):
            continue
        if out_of_time():
            break
        m, _ = pruned(spec)
        t = time.perf_counter()
        res = dev_tasks(m, tok, tasks, tasks_dir(args), args.limit, batch_size=args.eval_batch_size)
        rec = {
            "name": name,
            "limit": args.limit,
            "eval_s": round(time.perf_counter() - t, 1),
            "tasks": {
                k: {"acc": v.get("acc"), "acc_norm": v.get("acc_norm"), "n": v.get("n")}
                for k, v in res["tasks"].items()
            },
        }
        print(f"{name}: tasks {rec['tasks']} ({rec['eval_s']}s)", flush=True)
        append_jsonl(table, rec)
        done[name] = {**done.get(name, {}), **rec}
        del m
    note = (
        f"model {args.model}; perplexity on the first {ppl_tokens.numel():,} tokens of {Path(args.dev).name} "
        f"({ppl_tokens.shape[0]} windows of {args.window}); statistics from {args.calib_seqs} x {args.calib_len} "
        f"tokens of {Path(args.calib).name}; accuracy: zero-shot, first {args.limit} items per task, each "
        "task's summary metric (acc_norm for ARC and OpenBookQA, acc for social_iqa)"
    )
    _write_markdown(table, args.out / f"prune_table.{tag}.md", tasks, note)


def summary(metrics: dict, task: str) -> float | None:
    """The task's summary metric (acc_norm for ARC and OpenBookQA, acc otherwise) from a stored record."""
    from moekit.eval.tasks import summary_metric

    return metrics.get(summary_metric(task), metrics.get("acc"))


def _write_markdown(table: Path, out: Path, tasks: list[str], note: str = "") -> None:
    recs = {}
    for r in read_jsonl(table):
        recs[r["name"]] = {**recs.get(r["name"], {}), **r}
    head = "| configuration | # experts | # parameters | active | ppl | " + " | ".join(tasks) + " | mean |"
    lines = ([note, ""] if note else []) + [head, "|" + "---|" * (6 + len(tasks))]
    for r in recs.values():
        if "error" in r:
            lines.append(f"| {r['name']} | - | - | - | {r['error']} |" + " |" * (len(tasks) + 1))
            continue
        accs = [summary(r.get("tasks", {}).get(t, {}), t) for t in tasks]
        cells = [f"{a:.3f}" if a is not None else "" for a in accs]
        mean = f"{sum(accs) / len(accs):.3f}" if accs and all(a is not None for a in accs) else ""
        p = r["params"]
        lines.append(
            f"| {r['name']} | {r['experts']} | {p['total'] / 1e6:.1f}M | {p['active'] / 1e6:.1f}M | "
            f"{r['ppl']:.2f} | " + " | ".join(cells) + f" | {mean} |"
        )
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
