"""Which pruning criterion loses least: every criterion at 25% and 50% of routed experts removed.

    python bench/prune_table.py [--model smollm2-moe] [--limit 300] [--eval-rows ROWS] [--out bench/results]

For each criterion x ratio x budget (uniform, global), plus the challenge team's threshold rule, on a copy of
the model: parameters, perplexity (first --ppl-tokens tokens of the dev C4 file, --window windows) and,
for the rows chosen by --eval-rows, zero-shot dev-task accuracy (moekit.evaluate, --limit items per task).
Statistics come from moekit.profile on --calib-seqs x --calib-len calibration tokens (saved, reused).
Rows are appended to prune_table.jsonl as they finish; a rerun skips rows already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CRITERIA = ("frequency", "prob_mass", "weighted_frequency", "reap", "ean", "topk_prime", "random")


def row_name(criterion: str, ratio: float | None, budget: str, k_prime: int | None = None) -> str:
    if ratio is None:
        return f"threshold top-{k_prime} tau=1"
    return f"{criterion}{f' (k={k_prime})' if criterion == 'topk_prime' else ''} -{ratio:.0%} {budget}"


def plan_rows(top_k: int, ratios) -> list[dict]:
    rows = [{"name": "unpruned"}]
    k_prime = max(1, top_k // 2)
    for ratio in ratios:
        for budget in ("uniform", "global"):
            for c in CRITERIA:
                rows.append(
                    {
                        "name": row_name(c, ratio, budget, k_prime),
                        "criterion": c,
                        "ratio": ratio,
                        "budget": budget,
                        "top_k_prime": k_prime if c == "topk_prime" else None,
                    }
                )
    for k in sorted({top_k, k_prime, 1}, reverse=True):
        rows.append({"name": row_name("topk_prime", None, "", k), "criterion": "topk_prime", "top_k_prime": k, "tau": 1.0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--calib", default=str(DATA / "calib" / "c4_train_head.jsonl"))
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--ppl-data", default=str(DATA / "dev" / "c4_valid_dev.jsonl"))
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--tasks", default="arc_easy,openbookqa,social_iqa")
    ap.add_argument("--limit", type=int, default=300, help="items per task")
    ap.add_argument("--eval-rows", default="all", help="'all', 'none', or comma-separated row-name substrings")
    ap.add_argument("--only", default=None, help="run only rows whose name contains one of these (comma-separated)")
    ap.add_argument("--batch-size", type=int, default=4, help="perplexity windows per forward pass")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    from moekit import arch
    from moekit.data import calibration_tokens
    from moekit.models import load_model
    from moekit.perplexity import perplexity, windows
    from moekit.prune import PruneConfig, prune_
    from moekit.stats import ExpertStats

    args.out.mkdir(parents=True, exist_ok=True)
    tag = Path(args.model).name
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    stats_path = args.out / f"{tag}.stats.safetensors"
    if stats_path.exists():
        stats = ExpertStats.load(stats_path)
    else:
        from moekit.profile import ProfileConfig, profile

        calib = calibration_tokens(args.calib, tok, n_seq=args.calib_seqs, seq_len=args.calib_len, seed=0)
        t = time.perf_counter()
        stats = profile(model, calib, ProfileConfig())
        print(f"profiled {calib.numel():,} tokens in {time.perf_counter() - t:.0f}s")
        stats.save(stats_path)
    ppl_tokens = windows(tok, args.ppl_data, max_tokens=args.ppl_tokens, window=args.window)
    tasks = [t for t in args.tasks.split(",") if t]
    top_k = arch.moe_layers(model)[0].top_k
    rows = plan_rows(top_k, [float(r) for r in args.ratios.split(",")])
    if args.only:
        rows = [r for r in rows if any(s in r["name"] for s in args.only.split(","))]
    table = args.out / f"prune_table.{tag}.jsonl"
    done = {}
    if table.exists():
        done = {json.loads(line)["name"]: json.loads(line) for line in table.read_text().splitlines() if line.strip()}

    def wants_eval(name: str) -> bool:
        if args.eval_rows == "all":
            return True
        if args.eval_rows == "none":
            return False
        return any(s == name or (s != "unpruned" and s in name) for s in args.eval_rows.split(","))

    for spec in rows:
        name = spec["name"]
        need_eval = wants_eval(name) and bool(tasks)
        if name in done and (not need_eval or done[name].get("tasks")):
            continue
        m = copy.deepcopy(model)
        rec = {"name": name, **{k: v for k, v in spec.items() if k != "name"}}
        if name != "unpruned":
            cfg = PruneConfig(
                criterion=spec["criterion"],
                ratio=spec.get("ratio"),
                top_k_prime=spec.get("top_k_prime"),
                tau=spec.get("tau", 1.0),
                budget=spec.get("budget") or "uniform",
            )
            try:
                report = prune_(m, stats, cfg)
            except Exception as e:  # a guard (e.g. the threshold rule keeping < top-k) is a result too
                rec["error"] = str(e)
                print(f"{name}: {e}")
                _append(table, rec)
                continue
            rec["experts"] = report["experts_after"]
            rec["experts_per_layer"] = [r["experts_after"] for r in report["layers"]]
        else:
            rec["experts"] = sum(x.num_experts for x in arch.moe_layers(m))
        rec["params"] = arch.param_counts(m)
        t = time.perf_counter()
        rec["ppl"] = done.get(name, {}).get("ppl") or perplexity(
            m, ppl_tokens, batch_size=args.batch_size, progress=False
        )
        rec["ppl_s"] = round(time.perf_counter() - t, 1)
        if need_eval:
            from moekit.evaluate import dev_data_dir, evaluate

            t = time.perf_counter()
            res = evaluate(m, tok, tasks=tasks, data_dir=dev_data_dir(), limit=args.limit, batch_size=args.eval_batch_size)
            rec["tasks"] = {k: {"acc": v.get("acc"), "acc_norm": v.get("acc_norm")} for k, v in res["tasks"].items()}
            rec["eval_s"] = round(time.perf_counter() - t, 1)
            rec["limit"] = args.limit
        print(
            f"{name}: experts {rec['experts']} params {rec['params']['total']:,} ppl {rec['ppl']:.2f}"
            + (f" tasks {rec['tasks']}" if "tasks" in rec else ""),
            flush=True,
        )
        _append(table, rec)
        done[name] = rec
        del m
    _write_markdown(table, args.out / f"prune_table.{tag}.md", tasks)


def _append(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _write_markdown(table: Path, out: Path, tasks: list[str]) -> None:
    recs = {}
    for line in table.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["name"]] = {**recs.get(r["name"], {}), **r}
    head = "| configuration | # experts | # parameters | active | ppl | " + " | ".join(tasks) + " | mean |"
    lines = [head, "|" + "---|" * (6 + len(tasks))]
    for r in recs.values():
        if "error" in r:
            lines.append(f"| {r['name']} | - | - | - | {r['error']} |" + " |" * (len(tasks) + 1))
            continue
        accs = [r.get("tasks", {}).get(t, {}).get("acc") for t in tasks]
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
