"""Pruning vs merging at matched parameter counts, on the embedded default MoE.

For each size (routed experts kept per layer) the rows are

* ``prune``            REAP pruning to the size (``moekit.prune.prune_``, its default criterion);
* ``merge``            ``--grouping`` (default REAM) + ``--rule`` (default select), router row chosen by measurement;
* ``merge+learn``      the same with learned coefficients;
* ``prune+merge``      prune halfway, then merge (learned) down to the size;

all with the same expert count and expert size, so the same parameter count (printed). Metrics: perplexity
on the first ``--tokens`` tokens of the dev text (1024-token windows) and dev-task accuracy (``--limit`` items
per task). A second part (``--seeds``) repeats the coefficient learning with several calibration seeds and
checks the loss curves. Results: ``OUT/merge_table.json`` / ``.md``, ``OUT/merge_curves.png``.

    python bench/merge_table.py --model smollm2-moe --sizes 18 12 --limit 200 --seeds 0 1 2
    python bench/merge_table.py --explore   # block reconstruction error of every grouping x rule, no evaluation
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import common
from common import add_common, dev_accuracy, load, load_or_profile, parse, parser, tasks_dir

from moekit.core import arch
from moekit.data import calibration_tokens
from moekit.eval.perplexity import perplexity, windows
from moekit.merge.fit import capture_inputs, split_holdout
from moekit.merge.merge import MergeConfig, merge_
from moekit.profile.profile import ProfileConfig
from moekit.profile.stats import ExpertStats


def write_json(path: Path, obj) -> None:
    common.write_json(path, obj, indent=1)


@torch.no_grad()
def block_targets(base, calib, inputs) -> dict:
    """Held-back calibration inputs of every MoE block of the original model and the original outputs."""
    layers = arch.moe_layers(base)
    _, val = split_holdout(len(calib), 0.25, 0)
    out = {}
    for layer in layers:
        x = inputs[layer.index][val].reshape(1, -1, layer.hidden_size)
        out[layer.index] = (x, layer.block_forward(x))
    return out


@torch.no_grad()
def block_error(model, targets) -> float:
    """Mean over MoE layers of the relative squared error of the block output on the original inputs."""
    errs = []
    for layer in arch.moe_layers(model):
        x, y = targets[layer.index]
        errs.append(float((layer.block_forward(x) - y).pow(2).sum() / y.pow(2).sum()))
    return sum(errs) / len(errs)


def measure(model, ppl_tokens, targets) -> dict:
    t0 = time.perf_counter()
    row = {"params_total": arch.param_counts(model)["total"],
           "experts": sum(layer.num_experts for layer in arch.moe_layers(model)),
           "block_err": block_error(model, targets),
           "ppl": perplexity(model, ppl_tokens, batch_size=2, desc="ppl")}
    row["ppl_s"] = round(time.perf_counter() - t0, 1)
    return row


def measure_tasks(model, tok, args) -> dict:
    """Dev-task accuracy (each task's summary metric: acc_norm for ARC/OpenBookQA, acc for social_iqa) on the first
    ``--limit`` items of each task."""
    t0 = time.perf_counter()
    row = dev_accuracy(model, tok, args.tasks, tasks_dir(args), args.limit)
    row["task_mean"] = sum(row[t] for t in args.tasks) / len(args.tasks)
    row["tasks_s"] = round(time.perf_counter() - t0, 1)
    return row


def prune(model, stats: ExpertStats, keep: int, args) -> ExpertStats:
    """REAP pruning to ``keep`` experts per layer (``moekit.prune.prune.prune_``); returns the statistics
    re-indexed to the surviving experts."""
    from moekit.prune.prune import PruneConfig, prune_, stats_for_model

    none = args.super_rule == "none"
    prune_(model, PruneConfig(keep=keep, criterion="reap", super_rule="paper" if none else args.super_rule,
                              allow_super_experts=none), stats=stats)
    return stats_for_model(model, stats)


def build(kind: str, base, stats, size: int, calib, args, inputs=None, targets=None) -> tuple[object, dict]:
    """A compressed copy of ``base`` with ``size`` routed experts per layer."""
    model = copy.deepcopy(base)
    info: dict = {}
    learn = kind in ("merge+learn", "prune+merge") and args.steps > 0  # --steps 0: prune+merge without learning
    merge_cfg = dict(grouping=args.grouping, rule=args.rule, router=args.router, learn=learn, steps=args.steps,
                     lr=args.lr, super_rule=args.super_rule, seed=0)
    if kind == "prune":
        prune(model, stats, size, args)
    elif kind in ("merge", "merge+learn"):
        info = merge_(model, MergeConfig(target=size, **merge_cfg), stats=stats, tokens=calib, inputs=inputs)
    elif kind == "prune+merge":
        e = min(layer.num_experts for layer in arch.moe_layers(model))
        mid = size + (e - size) // 2
        pruned_stats = prune(model, stats, mid, args)
        pruned_inputs = capture_inputs(model, arch.moe_layers(model), calib)
        info["other_rules"] = {}
        for rule in args.compare_rules:  # same pruned model, same capture: block error only
            other = copy.deepcopy(model)
            merge_(other, MergeConfig(target=size, **dict(merge_cfg, rule=rule, learn=False)), stats=pruned_stats,
                   tokens=calib, inputs=pruned_inputs)
            info["other_rules"][rule] = block_error(other, targets)
            print(f"prune+merge {size} rule {rule}: block error {info['other_rules'][rule]:.4f}", flush=True)
            del other
        other_rules = info["other_rules"]
        info = merge_(model, MergeConfig(target=size, **merge_cfg), stats=pruned_stats, tokens=calib,
                      inputs=pruned_inputs)
        info.update(pruned_to=mid, other_rules=other_rules)
    else:
        raise ValueError(kind)
    return model, info


def learning_summary(report: dict) -> dict:
    layers = [r for r in report["layers"] if "curve" in r]
    if not layers:
        return {}
    mono_train = all(all(b <= a for a, b in zip(r["curve"]["train"], r["curve"]["train"][1:], strict=False))
                     for r in layers)
    mono_hold = sum(all(b <= a for a, b in zip(r["curve"]["holdout"], r["curve"]["holdout"][1:], strict=False))
                    for r in layers)
    return {"layers": len(layers), "train_monotone_all_layers": mono_train, "holdout_monotone_layers": mono_hold,
            "learned_not_worse_all_layers": all(r["error_learned"] <= r["error_init"] for r in layers),
            "improved_layers": sum(r["error_learned"] < r["error_init"] for r in layers),
            "mean_error_init": sum(r["error_init"] for r in layers) / len(layers),
            "mean_error_learned": sum(r["error_learned"] for r in layers) / len(layers),
            "rejected_steps": sum(r["rejected_steps"] for r in layers),
            "router_choices": {c: sum(r["router"]["choice"] == c for r in layers)
                               for c in ("dominant", "average", "fitted")}}


def plot_curves(reports: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 4), squeeze=False)
    for ax, (name, rep) in zip(axes[0], reports.items(), strict=True):
        for r in rep["layers"]:
            if "curve" in r:
                h = r["curve"]["holdout"]
                ax.plot([v / h[0] for v in h], lw=0.8)
        ax.set_title(f"{name}: held-back error / init, per layer", fontsize=9)
        ax.set_xlabel("accepted step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], tasks: list[str]) -> str:
    cols = ["size", "method", "experts", "params_total", "block_err", "ppl", *tasks, *(["task_mean"] if tasks else [])]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) and c != "ppl" else f"{v:.3f}" if isinstance(v, float)
                         else f"{v:,}" if isinstance(v, int) and c != "size" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def explore(base, stats, calib, targets, args, out: Path, inputs) -> None:
    """Block reconstruction error (held-back calibration tokens, original inputs) of each grouping x rule x
    router, without learning, and of pruning: cheap, to choose the settings the full table evaluates."""
    rows = []
    combos = [("hc", "avg", False), ("hc", "avg", True), ("hc", "select", False), ("mcsmoe", "avg", False),
              ("mcsmoe", "select", False), ("ream", "avg", False), ("ream", "select", False)]
    for size in args.sizes:
        try:
            model, _ = build("prune", base, stats, size, calib, args)
            rows.append({"size": size, "method": "prune", "block_err": block_error(model, targets)})
            print(rows[-1], flush=True)
        except ImportError:
            pass
        for grouping, rule, align in combos:
            cfg = MergeConfig(target=size, grouping=grouping, rule=rule, align=align, rank=24 if rule == "svd" else None,
                              router="auto", super_rule=args.super_rule)
            model = copy.deepcopy(base)
            rep = merge_(model, cfg, stats=stats, tokens=calib, inputs=inputs)
            choices = {c: sum(r["router"]["choice"] == c for r in rep["layers"]) for c in ("dominant", "average", "fitted")}
            rows.append({"size": size, "method": f"merge {grouping} {rule}{' align' if align else ''}",
                         "block_err": block_error(model, targets), "router": choices})
            print(rows[-1], flush=True)
            write_json(out / "merge_explore.json", {"model": args.model, "rows": rows})


def main(argv=None) -> None:
    p = add_common(parser(__doc__), limit=200)
    p.add_argument("--stats", default=None,
                   help="statistics file of --model (default: OUT/stats.safetensors; profiled on --calib when absent)")
    p.add_argument("--n-seq", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--sizes", type=int, nargs="+", default=[18, 12])
    p.add_argument("--methods", nargs="+", default=["prune", "merge", "merge+learn", "prune+merge"])
    p.add_argument("--tasks", nargs="*", default=["arc_easy", "openbookqa", "social_iqa"])
    p.add_argument("--grouping", default="ream")
    p.add_argument("--rule", default="select")
    p.add_argument("--compare-rules", nargs="*", default=[], help="prune+merge: block error of these rules too")
    p.add_argument("--router", default="auto")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--super-rule", default="paper")
    p.add_argument("--seeds", type=int, nargs="*", default=[], help="coefficient-learning stability runs (first size)")
    p.add_argument("--no-base", action="store_true", help="skip measuring the uncompressed model")
    p.add_argument("--explore", action="store_true", help="only the block error of groupings x rules (and pruning)")
    args = parse(p, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    base, tok = load(args.model)
    calib = calibration_tokens(args.calib, tok, n_seq=args.n_seq, seq_len=args.seq_len, seed=0)
    stats = load_or_profile(base, calib, args.stats or out / "stats.safetensors", ProfileConfig(batch_size=4))
    ppl_tokens = windows(tok, args.dev, max_tokens=args.tokens, window=1024)
    inputs = capture_inputs(base, arch.moe_layers(base), calib)
    targets = block_targets(base, calib, inputs)
    result = {"model": args.model, "args": vars(args), "torch_threads": torch.get_num_threads(), "rows": [],
              "learning": {}}
    path = out / "merge_table.json"
    if args.explore:
        explore(base, stats, calib, targets, args, out, inputs)
        return
    models = {}  # perplexity for every row first, then the seeds study, then the (slow) dev tasks
    if not args.no_base:
        result["rows"].append({"size": max(layer.num_experts for layer in arch.moe_layers(base)), "method": "base",
                               **measure(base, ppl_tokens, targets)})
        models[0] = base
        print(result["rows"][-1], flush=True)
        write_json(path, result)
    reports = {}
    for size in args.sizes:
        for kind in args.methods:
            t0 = time.perf_counter()
            model, info = build(kind, base, stats, size, calib, args, inputs, targets)
            row = {"size": size, "method": kind, "build_s": round(time.perf_counter() - t0, 1)}
            row.update(measure(model, ppl_tokens, targets))
            if info:
                row["learning"] = learning_summary(info)
                if info.get("other_rules"):
                    row["block_err_other_rules"] = info["other_rules"]
                reports[f"{kind} {size}"] = info
                write_json(out / f"merge_report_{kind.replace('+', '_')}_{size}.json", info)
            models[len(result["rows"])] = model
            result["rows"].append(row)
            print(row, flush=True)
            write_json(path, result)
    del inputs
    for seed in args.seeds:
        cfg = MergeConfig(target=args.sizes[0], grouping=args.grouping, rule=args.rule, router=args.router, learn=True,
                          steps=args.steps, lr=args.lr, super_rule=args.super_rule, seed=seed)
        seed_calib = calibration_tokens(args.calib, tok, n_seq=args.n_seq, seq_len=args.seq_len, seed=seed)
        rep = merge_(copy.deepcopy(base), cfg, stats=stats, tokens=seed_calib)  # its own calibration sample: its own capture
        result["learning"][f"seed {seed}"] = learning_summary(rep)
        reports[f"seed {seed}"] = rep
        print(seed, result["learning"][f"seed {seed}"], flush=True)
        write_json(path, result)
    if reports:
        plot_curves(reports, out / "merge_curves.png")
    (out / "merge_table.md").write_text(markdown(result["rows"], []) + "\n")
    if args.tasks:
        for i, model in models.items():
            result["rows"][i].update(measure_tasks(model, tok, args))
            print(result["rows"][i], flush=True)
            write_json(path, result)
            (out / "merge_table.md").write_text(markdown(result["rows"], args.tasks) + "\n")
    print(markdown(result["rows"], args.tasks))


if __name__ == "__main__":
    main()
