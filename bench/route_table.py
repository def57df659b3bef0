"""Fewer active experts per token on the embedded default MoE: plain top-k against each training-free mitigation.

For k = K/2 and K/4: perplexity (first 16,384 tokens of DATA_DIR/dev/c4_valid_dev.jsonl, 1024-token windows),
the average routed experts measured on those windows, dev-task accuracy for the key configurations, and the share
of the perplexity / accuracy lost by plain top-k that each method wins back. Then prefill and decode tokens/s of
the original and the chosen default, measured side by side in one run.

    PYTHONPATH=$PWD python bench/route_table.py --model smollm2-moe --out bench/results

Results go to OUT/route_table.jsonl (one line per configuration, appended as they finish, so a partial run is
usable) and OUT/route_table.md.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from common import (DEV_TASKS, add_common, append_jsonl, dev_accuracy, load, load_or_profile, parse, parser,
                    read_jsonl, tasks_dir)

from moekit.core import arch
from moekit.data import calibration_tokens
from moekit.eval.perplexity import perplexity, windows
from moekit.profile.profile import ProfileConfig
from moekit.route.calibrate import ActiveCounter
from moekit.route.route import RouteConfig, route_

# name -> RouteConfig keyword arguments (top_k is filled in per budget)
METHODS = {
    "plain": {},
    "renorm": {"mitigations": ("renorm",)},
    "rescale-norm": {"mitigations": ("rescale",), "rescale_mode": "norm"},
    "rescale-lsq": {"mitigations": ("rescale",), "rescale_mode": "lsq"},
    "compensate": {"mitigations": ("compensate",)},
    "allocate": {"mitigations": ("allocate",)},
    "adaptive-cumprob": {"mitigations": ("adaptive",), "adaptive_rule": "cumprob"},
    "adaptive-beta": {"mitigations": ("adaptive",), "adaptive_rule": "beta"},
    "super": {"mitigations": ("super",)},
    "compensate+allocate": {"mitigations": ("compensate", "allocate")},
    "compensate+adaptive": {"mitigations": ("compensate", "adaptive")},
    "compensate+rescale-lsq": {"mitigations": ("compensate", "rescale"), "rescale_mode": "lsq"},
    "allocate+rescale-lsq": {"mitigations": ("allocate", "rescale"), "rescale_mode": "lsq"},
    "adaptive-cumprob+rescale-lsq": {"mitigations": ("adaptive", "rescale"), "adaptive_rule": "cumprob", "rescale_mode": "lsq"},
    "allocate+rescale-lsq+super": {"mitigations": ("allocate", "rescale", "super"), "rescale_mode": "lsq"},
    # keep_weights: the kept experts keep their original top-K weights (the router does not renormalise them)
    "keep": {"keep_weights": True},
    "keep+rescale-lsq": {"mitigations": ("rescale",), "rescale_mode": "lsq", "keep_weights": True},
    "adaptive-cumprob+keep": {"mitigations": ("adaptive",), "adaptive_rule": "cumprob", "keep_weights": True},
    "adaptive-beta+keep": {"mitigations": ("adaptive",), "adaptive_rule": "beta", "keep_weights": True},
    "adaptive-beta+keep+rescale-lsq": {"mitigations": ("adaptive", "rescale"), "adaptive_rule": "beta",
                                       "rescale_mode": "lsq", "keep_weights": True},
    "allocate+keep+rescale-lsq": {"mitigations": ("allocate", "rescale"), "rescale_mode": "lsq", "keep_weights": True},
}


@torch.no_grad()
def ppl_and_k(model, toks, batch_size):
    with ActiveCounter(model) as counter:
        value = perplexity(model, toks, batch_size=batch_size, progress=False)
    return value, counter.result()["average"]


def accuracy(args, model, tok, tasks):
    """acc_norm for ARC and OpenBookQA, acc for social_iqa, on the first --limit items of each dev task."""
    return dev_accuracy(model, tok, tasks, tasks_dir(args), args.limit)


@torch.no_grad()
def speed(models: dict, tok, dev: str, prefill_len=512, decode_new=32, repeats=2):
    """Prefill (one forward of prefill_len tokens of ``dev``) and greedy decode tokens/s, models interleaved per
    repeat."""
    text = Path(dev).read_text().splitlines()
    ids = tok(json.loads(text[0])["text"] + json.loads(text[1])["text"], return_tensors="pt")["input_ids"]
    prompt = ids[:, :prefill_len]
    short = ids[:, :32]
    best = {name: {"prefill": 0.0, "decode": 0.0} for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(prompt, use_cache=False)
            best[name]["prefill"] = max(best[name]["prefill"], prompt.numel() / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            out = m.generate(short, max_new_tokens=decode_new, min_new_tokens=decode_new, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
            n_new = out.shape[1] - short.shape[1]
            best[name]["decode"] = max(best[name]["decode"], n_new / (time.perf_counter() - t0))
    return best


def recovery(plain, method, orig, higher_is_better=False):
    lost = (orig - plain) if higher_is_better else (plain - orig)
    won = (method - plain) if higher_is_better else (plain - method)
    return won / lost if lost > 0 else None


def main():
    ap = add_common(parser(__doc__), limit=300, limit_help="items per dev task (0: no accuracy)")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--budgets", default="2,4", help="divisors of K: 2 -> K/2, 4 -> K/4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--methods-per-budget", default="", help="override --methods per budget: '2=a,b;4=c'")
    ap.add_argument("--acc-methods", default="plain,best", help="methods whose task accuracy is measured ('best' or 'topN' by perplexity; "
                    "lowest perplexity at that budget); the original model always")
    ap.add_argument("--speed-method", default="best", help="method timed against the original at K/2 ('' to skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--summarise", action="store_true", help="only rebuild the table from OUT/route_table.jsonl")
    ap.add_argument("--skip-original", action="store_true", help="the original is already in the log")
    ap.add_argument("--stage", default="all", choices=["all", "ppl", "acc", "speed"],
                    help="run one stage only: ppl (table rows), acc (task accuracy of --acc-methods; 'best' read from "
                         "the log), speed (original vs plain and --speed-method at the first budget)")
    args = parse(ap)
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "route_table.jsonl"
    if args.summarise:
        print(summarise(log))
        return

    def emit(row):
        print(json.dumps(row), flush=True)
        append_jsonl(log, row)

    model, tok = load(args.model)
    layers = arch.moe_layers(model)
    big_k = layers[0].top_k
    calib = calibration_tokens(args.calib, tok, n_seq=args.calib_seqs, seq_len=args.calib_len, seed=0)
    toks = windows(tok, args.dev, max_tokens=args.ppl_tokens, window=args.window)
    stats = load_or_profile(model, calib, cfg=ProfileConfig(progress=False))
    tasks = DEV_TASKS if args.limit > 0 else ()
    setting = {"model": args.model, "K": big_k, "experts": layers[0].num_experts, "moe_layers": len(layers),
               "calib_tokens": int(calib.numel()), "ppl_tokens": int(toks.numel()), "window": args.window,
               "limit": args.limit, "threads": torch.get_num_threads(), "profile": True, "evaluator": True}
    emit({"setting": setting})

    if args.stage in ("acc", "speed"):
        return later_stage(args, model, tok, calib, stats, tasks, big_k, log, emit)
    if not args.skip_original:
        t0 = time.perf_counter()
        orig_ppl, orig_k = ppl_and_k(model, toks, args.batch_size)
        emit({"budget": "K", "method": "original", "ppl": orig_ppl, "avg_k": orig_k, "avg_k_calib": big_k,
              "seconds": time.perf_counter() - t0})
        if tasks:
            emit({"budget": "K", "method": "original", "acc": accuracy(args, model, tok, tasks)})

    results = {}
    for div in [int(d) for d in args.budgets.split(",")]:
        k = big_k // div
        per_budget = dict(part.split("=", 1) for part in args.methods_per_budget.split(";") if part)
        for name in per_budget.get(str(div), args.methods).split(","):
            cfg_kw = METHODS[name]
            mits = cfg_kw.get("mitigations", ())
            if stats is None and {"compensate", "super"} & set(mits):
                emit({"budget": f"K/{div}", "method": name, "skipped": "no profile (moekit.profile not installed)"})
                continue
            if name == "renorm" and layers[0].norm_topk_prob:
                emit({"budget": f"K/{div}", "method": name, "skipped": "identical to plain: the router renormalises"})
                continue
            t0 = time.perf_counter()
            m = copy.deepcopy(model)
            try:
                rep = route_(m, RouteConfig(top_k=k, **cfg_kw), stats=stats, tokens=calib)
            except Exception as e:  # noqa: BLE001 - a method that cannot apply is reported, the table goes on
                emit({"budget": f"K/{div}", "method": name, "skipped": f"{type(e).__name__}: {e}"})
                continue
            if name == "super" and not rep["super_experts"]:
                emit({"budget": f"K/{div}", "method": name, "skipped": "no super expert detected (same as plain)"})
                continue
            value, avg_k = ppl_and_k(m, toks, args.batch_size)
            row = {"budget": f"K/{div}", "k": k, "method": name, "ppl": value, "avg_k": avg_k,
                   "avg_k_calib": rep["average_active_experts"], "compute_saved": 1 - avg_k / big_k,
                   "form": rep["form"], "top_k_per_layer": rep["top_k_per_layer"], "threshold": rep["threshold"],
                   "scales": rep["scales"], "super": rep["super_experts"], "seconds": time.perf_counter() - t0}
            results[(div, name)] = row
            emit(row)
            del m
        ranked = rank_by_ppl(r for (d, _), r in results.items() if d == div)
        best = ranked[0] if ranked else None
        for name in expand_acc_methods(args.acc_methods, ranked):
            if not tasks or (div, name) not in results:
                continue
            m = copy.deepcopy(model)
            route_(m, RouteConfig(top_k=k, **METHODS[name]), stats=stats, tokens=calib)
            acc = accuracy(args, m, tok, tasks)
            emit({"budget": f"K/{div}", "method": name, "acc": acc})
            del m
        emit({"budget": f"K/{div}", "best": best})

    if args.speed_method:
        div = int(args.budgets.split(",")[0])
        ranked = rank_by_ppl(r for (d, _), r in results.items() if d == div)
        name = (ranked[0] if ranked else "plain") if args.speed_method == "best" else args.speed_method
        speed_stage(model, tok, args.dev, calib, stats, big_k, div, name, emit)

    print(summarise(log))


def speed_stage(model, tok, dev, calib, stats, big_k, div, name, emit) -> None:
    """Prefill/decode speed of the original, plain top-(K/div) and ``name`` at K/div, measured in one run."""
    models = {"original": model}
    for nm in dict.fromkeys(["plain", name]):
        m = copy.deepcopy(model)
        route_(m, RouteConfig(top_k=big_k // div, **METHODS[nm]), stats=stats, tokens=calib)
        models[f"{nm}@K/{div}"] = m
    for impl in ("grouped_mm", "eager"):
        for m in models.values():
            m.config._experts_implementation = impl
        emit({"speed": speed(models, tok, dev), "experts_implementation": impl, "threads": torch.get_num_threads()})


def expand_acc_methods(spec: str, ranked: list[str]) -> list[str]:
    """'plain,best' or 'plain,top3' -> method names; ``ranked`` is the budget's methods, lowest perplexity first."""
    names = []
    for n in spec.split(","):
        if n == "best":
            names += ranked[:1]
        elif n.startswith("top") and n[3:].isdigit():
            names += ranked[: int(n[3:])]
        elif n:
            names.append(n)
    return list(dict.fromkeys(names))


def rank_by_ppl(rows) -> list[str]:
    """Methods of ``rows`` by perplexity, lowest first; a method whose perplexity equals a better-ranked one's (the
    same model built another way, e.g. ``+super`` where no super expert is ever dropped) is left out."""
    out, seen = [], []
    for r in sorted(rows, key=lambda r: r["ppl"]):
        if r["method"] in out or any(abs(r["ppl"] - p) <= 1e-6 * p for p in seen):
            continue
        out.append(r["method"])
        seen.append(r["ppl"])
    return out


def ranked_in_log(log: Path, budget: str) -> list[str]:
    rows = read_jsonl(log)
    return rank_by_ppl(r for r in rows if r.get("budget") == budget and "ppl" in r)


def best_in_log(log: Path, budget: str) -> str:
    return (ranked_in_log(log, budget) or ["plain"])[0]


def later_stage(args, model, tok, calib, stats, tasks, big_k, log, emit):
    divs = [int(d) for d in args.budgets.split(",")]
    if args.stage == "acc":
        if not args.skip_original:
            emit({"budget": "K", "method": "original", "acc": accuracy(args, model, tok, tasks)})
        for div in divs:
            for name in expand_acc_methods(args.acc_methods, ranked_in_log(log, f"K/{div}")):
                m = copy.deepcopy(model)
                route_(m, RouteConfig(top_k=big_k // div, **METHODS[name]), stats=stats, tokens=calib)
                emit({"budget": f"K/{div}", "method": name, "acc": accuracy(args, m, tok, tasks),
                      "limit": args.limit})
                del m
    else:
        div = divs[0]
        name = best_in_log(log, f"K/{div}") if args.speed_method == "best" else args.speed_method
        speed_stage(model, tok, args.dev, calib, stats, big_k, div, name, emit)
    print(summarise(log))


def summarise(log: Path) -> str:
    """Markdown table over every row in the log (later rows win), with the share of the loss each method recovers."""
    rows, acc, setting, speeds = {}, {}, {}, []
    for r in read_jsonl(log):
        if "setting" in r:
            setting = r["setting"]
        elif "speed" in r:
            speeds.append(r)
        elif "ppl" in r:
            rows[(r["budget"], r["method"])] = r
        elif "acc" in r:
            acc[(r["budget"], r["method"])] = r["acc"]
    for key, a in acc.items():
        if key in rows:
            rows[key]["acc"] = a

    def mean(a):
        return sum(a.values()) / len(a) if a else None

    def fmt(x, p=3):
        return "—" if x is None else f"{x:.{p}f}"

    orig = rows.get(("K", "original"))
    lines = [f"setting: {json.dumps(setting)}", "",
             "| budget | method | avg k measured (dev) | avg k (calib) | ppl | ppl recovered | arc_e | obqa | siqa | "
             "mean acc | acc recovered | checkpoint |", "|" + "---|" * 12]
    for (budget, name), r in sorted(rows.items(), key=lambda kv: (kv[0][0] != "K", kv[0][0], kv[1]["ppl"])):
        plain = rows.get((budget, "plain"))
        ppl_rec = acc_rec = None
        if plain and orig and name not in ("plain", "original"):
            ppl_rec = recovery(plain["ppl"], r["ppl"], orig["ppl"])
            if r.get("acc") and plain.get("acc") and orig.get("acc"):
                acc_rec = recovery(mean(plain["acc"]), mean(r["acc"]), mean(orig["acc"]), True)
        a = r.get("acc") or {}
        lines.append(f"| {budget} | {name} | {fmt(r['avg_k'])} | {fmt(r.get('avg_k_calib'))} | {r['ppl']:.3f} | "
                     f"{fmt(ppl_rec, 2)} | {fmt(a.get('arc_easy'))} | {fmt(a.get('openbookqa'))} | "
                     f"{fmt(a.get('social_iqa'))} | {fmt(mean(a))} | {fmt(acc_rec, 2)} | {r.get('form', 'standard')} |")
    for sp in speeds:
        lines += ["", f"speed ({sp['experts_implementation']} experts, {sp['threads']} threads), tokens/s:",
                  "| model | prefill | decode |", "|---|---|---|"]
        base = sp["speed"]["original"]
        for name, v in sp["speed"].items():
            lines.append(f"| {name} | {v['prefill']:.0f} ({v['prefill'] / base['prefill']:.2f}x) | "
                         f"{v['decode']:.1f} ({v['decode'] / base['decode']:.2f}x) |")
    text = "\n".join(lines) + "\n"
    (log.parent / "route_table.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
