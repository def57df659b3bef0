"""Router distillation on the embedded default MoE: how much of what pruning and re-routing lose comes back when
only the routers (and one output scale per layer) learn from the original model (arXiv 2603.02217).

    python bench/router_distill.py --threads 1        # smollm2-moe, 64k training tokens each (hours on a shared CPU)
    python bench/router_distill.py --tokens 1024 --batch-size 2 --seq-len 256 --every 512 --ppl-tokens 1024 \
        --heldout 1 --threads 1 --out /tmp/rd         # a smoke run (7 minutes)

Students of the model: REAP-pruned -25% and -50% of the routed experts (``PruneConfig(ratio=...)``), merged to
the same 18 and 12 experts per layer (``MergeConfig(target=...)``, moekit merge's defaults) and re-routed 8 -> 4
experts per token with ``rescale`` (lsq); the last three also with "+ refit": the least-squares refit of the down
projections to the original's layer outputs (`moekit heal --no-router --local-epochs 0`) before distilling. Each is distilled by ``distill_router_`` from the
original on the calibration text (DATA_DIR/calib/c4_train_head.jsonl, packed into --seq-len sequences; the last
--heldout sequences measure the KL before and after) and scored every --every training tokens on the first
--ppl-tokens tokens of DATA_DIR/dev/c4_valid_dev.jsonl (1024-token windows). Writes OUT/tables/router_distill.json
(the table, with every curve under "raw") and OUT/router_distill.png (perplexity against training tokens).

With --experts the students' whole MoE blocks train (``RouterDistillConfig(train_experts=True)``: routed experts,
shared expert and routers; `moekit distill-router --experts`), written to OUT/tables/router_distill_experts.json and
OUT/router_distill_experts.png instead.

Each student's result is appended to OUT/router_distill.jsonl as it finishes, with the settings it ran under; the
table holds every student logged under the current settings (the latest run of each), so students can be run in
separate processes (``--configs``) and a rerun skips the students already logged (``--fresh`` starts over).
Beside each student the table gives a reference at the same cost: plain top-4 for the re-routed student (the share
of its loss won back is the issue's measure), REAP pruning to the same count for the merged ones.
"""

from __future__ import annotations

import copy
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, add_common, append_jsonl, load, load_or_profile, parse, parser, read_jsonl

from moekit.carve.heal import HealConfig, heal_
from moekit.data import calibration_tokens
from moekit.eval.perplexity import perplexity, windows
from moekit.merge.merge import MergeConfig, merge_
from moekit.outputs import save_figure, write_json
from moekit.prune.prune import PruneConfig, prune_
from moekit.route.route import RouteConfig, route_
from moekit.train.router import RouterDistillConfig, distill_router_

CONFIGS = {  # name -> what makes the student from the original (in place)
    "pruned -25% (reap)": lambda m, stats, calib: prune_(m, PruneConfig(criterion="reap", ratio=0.25), stats=stats),
    "pruned -50% (reap)": lambda m, stats, calib: prune_(m, PruneConfig(criterion="reap", ratio=0.5), stats=stats),
    "merged to 18 (REAM + select)": lambda m, stats, calib: merge_(m, MergeConfig(target=18), stats=stats, tokens=calib),
    "merged to 12 (REAM + select)": lambda m, stats, calib: merge_(m, MergeConfig(target=12), stats=stats, tokens=calib),
    "top-4 of 8 (rescale)": lambda m, stats, calib: route_(m, RouteConfig(top_k=4, mitigations=("rescale",)),
                                                           stats=stats, tokens=calib),
}
for _name in ("merged to 18 (REAM + select)", "merged to 12 (REAM + select)", "top-4 of 8 (rescale)"):
    CONFIGS[_name + " + refit"] = lambda m, stats, calib, make=CONFIGS[_name]: refit(make(m, stats, calib), m, calib)
REFERENCES = {  # name -> (what the student is compared with, how that model is made from the original)
    "merged to 18 (REAM + select)": ("REAP pruned to 18", CONFIGS["pruned -25% (reap)"]),
    "merged to 12 (REAM + select)": ("REAP pruned to 12", CONFIGS["pruned -50% (reap)"]),
    "top-4 of 8 (rescale)": ("plain top-4", lambda m, stats, calib: route_(m, RouteConfig(top_k=4), stats=stats)),
}
REFERENCES.update({name + " + refit": REFERENCES[name] for name in list(REFERENCES)})


def refit(_report, student, calib) -> None:
    """The least-squares refit of ``student``'s down projections to the original model's layer outputs, layer by
    layer on the refitted prefix's states (`moekit heal --no-router --local-epochs 0`; bench/propagate.py). The
    original is the model the student was copied from: ``ORIGINAL`` (set in main)."""
    heal_(student, HealConfig(router=False, lstsq=True, local_epochs=0), tokens=calib, teacher=ORIGINAL[0],
          progress=False)


ORIGINAL: list = []


def main(argv=None) -> None:
    ap = add_common(parser(__doc__))
    ap.add_argument("--tokens", type=int, default=65536, help="training-token budget per student")
    ap.add_argument("--every", type=int, default=8192, help="score the student every this many training tokens")
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="dev tokens scored (1024-token windows)")
    ap.add_argument("--batch-size", type=int, default=RouterDistillConfig.batch_size)
    ap.add_argument("--seq-len", type=int, default=RouterDistillConfig.seq_len)
    ap.add_argument("--lr", type=float, default=RouterDistillConfig.lr)
    ap.add_argument("--heldout", type=int, default=RouterDistillConfig.heldout)
    ap.add_argument("--experts", action="store_true",
                    help="train the whole MoE blocks (experts, shared expert, routers), not only the routers")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--fresh", action="store_true", help="forget the students logged under these settings")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (on a CPU shared with other jobs 1 can be several times faster than 2)")
    args = parse(ap, argv)
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load(args.model)
    ORIGINAL.append(model)
    calib = calibration_tokens(args.calib, tok, n_seq=16, seq_len=512)  # profile and rescale, as bench/serve_speed.py
    stats = load_or_profile(model, calib, RESULTS / "smollm2-moe.stats.safetensors" if args.model == "smollm2-moe" else None)
    dev = windows(tok, args.dev, max_tokens=args.ppl_tokens, window=1024)
    original = perplexity(model, dev, progress=False)
    print(f"original: perplexity {original:.2f}", flush=True)
    per_step = args.batch_size * args.seq_len
    every = max(1, args.every // per_step)  # steps between scores
    log = out / "router_distill.jsonl"
    setup = {"model": args.model, "tokens": args.tokens, "every": args.every, "ppl_tokens": dev.numel(),
             "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "heldout": args.heldout,
             "calib": Path(args.calib).name}
    if args.experts:  # kept out of the setup otherwise, so the router-only rows logged before stay current
        setup["experts"] = True
    stem = "router_distill_experts" if args.experts else "router_distill"
    if args.fresh and log.exists():
        log.unlink()
    for name in args.configs:
        if any(x["setup"] == setup and x["name"] == name for x in read_jsonl(log)):
            print(f"{name}: logged in {log} under these settings (--fresh runs it again)", flush=True)
            continue
        reference = None
        if name in REFERENCES:
            label, make = REFERENCES[name]
            ref = copy.deepcopy(model)
            with torch.no_grad():
                make(ref, stats, calib)
            reference = {"label": label, "ppl": perplexity(ref, dev, progress=False)}
            print(f"{name}: reference {label}: perplexity {reference['ppl']:.2f}", flush=True)
            del ref
        student = copy.deepcopy(model)
        t = time.perf_counter()
        with torch.no_grad():
            CONFIGS[name](student, stats, calib)
        make_s = time.perf_counter() - t
        curve, eval_s = [[0, perplexity(student, dev, progress=False)]], [0.0]
        print(f"{name}: perplexity {curve[0][1]:.2f} before", flush=True)

        def score(step: int, student=student, curve=curve, eval_s=eval_s, name=name) -> None:
            if step % every == 0:
                t = time.perf_counter()
                curve.append([step * per_step, perplexity(student, dev, progress=False)])
                eval_s[0] += time.perf_counter() - t
                print(f"{name}: {curve[-1][0]:,} tokens, perplexity {curve[-1][1]:.2f}", flush=True)

        cfg = RouterDistillConfig(max_tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                  heldout=args.heldout, train_experts=args.experts)
        rep = distill_router_(student, cfg, tokens=args.calib, teacher=model, tokenizer=tok, callback=score)
        x = {"name": name, "setup": setup, "original_ppl": original, "reference": reference, "make_seconds": make_s,
             "curve": curve, "train_seconds": rep["seconds"] - eval_s[0], "tokens": rep["tokens_run"],
             "steps": rep["steps_run"], "losses": rep["losses"], "kl_heldout_before": rep["kl_heldout_before"],
             "kl_heldout_after": rep["kl_heldout_after"], "heldout_tokens": rep["heldout_tokens"],
             "scales": rep["scales"], "trained_parameters": rep["trained_parameters"]}
        out.mkdir(parents=True, exist_ok=True)
        append_jsonl(log, x)
        print(f"{name}: perplexity {curve[0][1]:.2f} -> {curve[-1][1]:.2f} in {x['train_seconds']:.0f}s of "
              f"training; held-out KL {rep['kl_heldout_before']:.4f} -> {rep['kl_heldout_after']:.4f}", flush=True)
        del student

    raw = {x["name"]: x for x in read_jsonl(log) if x["setup"] == setup}  # the latest run of each student
    raw = {name: raw[name] for name in CONFIGS if name in raw}
    if not raw:
        return
    marks = [t for t, _ in next(iter(raw.values()))["curve"]]
    rows = []
    for name, r in raw.items():
        before, after, ref = r["curve"][0][1], r["curve"][-1][1], r.get("reference")
        won = f"{(ref['ppl'] - after) / (ref['ppl'] - original):.0%}" if ref else "–"
        rows.append([name, before, *[p for _, p in r["curve"][1:]], f"{(before - after) / (before - original):.0%}",
                     f"{ref['label']}: {ref['ppl']:.2f}" if ref else "–", won,
                     f"{r['kl_heldout_before']:.3f} → {r['kl_heldout_after']:.3f}", round(r["train_seconds"])])
    columns = ["student", "ppl before", *[f"ppl after {kilo(t)} tokens" for t in marks[1:]],
               "own loss recovered", "reference (ppl)", "reference's loss won back", "held-out KL before → after",
               "training s"]
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--configs" in argv:  # the students may come from several processes: the command without the choice of them
        i = argv.index("--configs")
        j = next((k for k in range(i + 1, len(argv)) if argv[k].startswith("--")), len(argv))
        argv = argv[:i] + argv[j:]
    write_json(out / "tables" / f"{stem}.json", {
        "title": "Distillation of the whole MoE blocks (experts, shared expert, routers) after compression" if args.experts
                 else "Router distillation after pruning, merging and re-routing: only the routers and one scale per "
                      "layer train",
        "command": "python bench/router_distill.py " + shlex.join(argv) + " (each student logged as it finishes; "
                   "--configs NAME runs one)",
        "model": f"{args.model} (original perplexity {original:.2f}); students: " + "; ".join(raw) + " (REAP pruning, "
                 "REAM merging with the select rule, rescale by least squares; refit: bench/propagate.py)",
        "data": f"training: {args.tokens:,} tokens of {Path(args.calib).name} in {args.batch_size} x {args.seq_len} "
                f"batches, lr {args.lr:g} (warm-up, cosine), forward KL from the original; held out: its last "
                f"{args.heldout} sequences; perplexity: first {dev.numel():,} tokens of {Path(args.dev).name} in "
                "1024-token windows",
        "machine": f"2-core development CPU (shared with other jobs), fp32, {torch.get_num_threads()} torch "
                   f"thread(s), torch {torch.__version__}",
        "date": None, "recorded": datetime.date.today().isoformat(),
        "columns": columns, "formats": ["", ".2f", *[".2f"] * (len(marks) - 1), "", "", "", "", ""], "rows": rows,
        "raw": {"original_ppl": original, **raw}}, overwrite=True)

    plot(raw, original, out / f"{stem}.png", every * per_step, "MoE-block distillation" if args.experts else
         "router distillation")
    print(f"-> {out / 'tables' / f'{stem}.json'}, {out / f'{stem}.png'}", flush=True)


def kilo(tokens: int) -> str:
    return f"{tokens / 1024:g}k"


def plot(raw: dict, original: float, path: Path, every_tokens: int, title: str) -> None:
    """Perplexity against training tokens, and the perplexity each interval gained, per student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = [t for t, _ in next(iter(raw.values()))["curve"]]
    fig, (ax, gain) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(raw)
    for i, (name, r) in enumerate(raw.items()):
        t, p = zip(*r["curve"], strict=True)
        ax.plot([x / 1024 for x in t], p, marker="o", label=name)
        gain.bar([j + i * width for j in range(len(t) - 1)], [a - b for a, b in zip(p, p[1:], strict=False)], width,
                 label=name)
    gain.set_xticks([j + width * (len(raw) - 1) / 2 for j in range(len(marks) - 1)], [kilo(x) for x in marks[1:]])
    gain.axhline(0, color="k", lw=0.5)
    ax.axhline(original, color="k", ls="--", lw=1, label="original")
    ax.set(xlabel="training tokens (k)", ylabel="dev perplexity", title=title)
    gain.set(xlabel="after training tokens", ylabel="perplexity gained in the last interval",
             title=f"gain per {kilo(every_tokens)} tokens")
    ax.legend(), gain.legend()
    fig.tight_layout()
    save_figure(fig, path, overwrite=True)
    plt.close(fig)


if __name__ == "__main__":
    main()
