"""MoE -> dense on the embedded default MoE: every score, two K, before/after a CPU-sized distillation,
against the paper's control (dense SmolLM2 width-pruned to the same FFN width and distilled alike).

    PYTHONPATH=$PWD python bench/densify_table.py --out bench/results

Rows are cached in OUT/densify_table.json as they finish (rerunning fills only what is missing), so the
run can be stopped and resumed. Perplexity: first --ppl-tokens tokens of --dev (DATA_DIR/dev/c4_valid_dev.jsonl) in
1024-token windows (fp32). Tasks: moekit.eval.harness.evaluate on the dev tasks, first --task-limit items each.
Distillation: forward KL from the teacher (the MoE for densified students, dense SmolLM2 for the control),
--distill-steps x --distill-batch x --distill-seq tokens streamed from --calib (DATA_DIR/calib/c4_train_head.jsonl).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from common import DEV_TASKS, add_common, dev_accuracy, load, load_or_profile, mean, parser, tasks_dir
from common import parse as parse_args

SCORES = ("sf", "cp", "acp", "do-acp", "reap", "ean", "random")


def parse():
    p = add_common(parser(__doc__))
    p.add_argument("--dense", default="smollm2", help="the dense model of the control")
    p.add_argument("--ks", type=int, nargs="*", default=[8, 4])
    p.add_argument("--scores", nargs="+", default=list(SCORES))
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--task-limit", type=int, default=25, help="items per dev task (0: skip tasks)")
    p.add_argument("--calib-seq", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--gram", type=int, default=256, help="tokens for the Gram matrix of expert outputs")
    p.add_argument("--distill-steps", type=int, default=16)
    p.add_argument("--distill-batch", type=int, default=2)
    p.add_argument("--distill-seq", type=int, default=128)
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-top", type=int, default=2, help="distil the best N scores (by perplexity) and random")
    p.add_argument("--no-distill", action="store_true")
    p.add_argument("--distill-ks", type=int, nargs="*", default=None, help="distil only at these K (default: all)")
    p.add_argument("--control-only", action="store_true", help="only the dense baseline and the control rows")
    p.add_argument("--control-widths", type=int, nargs="*", default=[], help="FFN widths of the control, one per K")
    p.add_argument("--variants", action="store_true",
                   help="also the grouping and down-scaling variants (merge grouping, score-proportional down_proj) "
                        "of the best score at each K, before distillation")
    p.add_argument("--control-moe-teacher", action="store_true",
                   help="also distil the control from the MoE teacher (the densified students' teacher), so that only "
                        "the starting point differs")
    p.add_argument("--threads", type=int, default=0)
    return parse_args(p)


class Table:
    """Rows cached in a JSON file, written atomically after every change."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"meta": meta, "rows": {}}
        self.data["meta"].update(meta)

        self.touched: set[str] = set()

    def row(self, name: str) -> dict:
        self.touched.add(name)
        return self.data["rows"].setdefault(name, {})

    def save(self) -> None:
        """Write this process's rows over the file's current content (two runs may share the file)."""
        if self.path.exists():
            disk = json.loads(self.path.read_text())
            disk["rows"].update({k: v for k, v in self.data["rows"].items() if k in self.touched})
            for k, v in disk["rows"].items():
                if k not in self.touched:
                    self.data["rows"][k] = v
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def evaluate_row(table: Table, name: str, build, tok, ppl_tokens, args, extra=None) -> None:
    """Fill the missing metrics of row ``name``; ``build()`` makes the model only when something is missing."""
    from moekit.eval.perplexity import perplexity

    row = table.row(name)
    row.update(extra or {})
    want_tasks = args.task_limit > 0 and row.get("task_limit") != args.task_limit
    if row.get("ppl_tokens") != ppl_tokens.numel():
        row.pop("ppl", None)
    if "ppl" in row and not want_tasks:
        return
    model = build()
    row.setdefault("params", sum(p.numel() for p in model.parameters()))
    from moekit.core.arch import is_moe

    row.setdefault("ffn_width", None if is_moe(model) else model.config.intermediate_size)
    if "ppl" not in row:
        t0 = time.perf_counter()
        row["ppl"] = perplexity(model, ppl_tokens, batch_size=4, desc=f"ppl {name}")
        row["ppl_tokens"] = ppl_tokens.numel()
        row["ppl_seconds"] = round(time.perf_counter() - t0, 1)
        table.save()
        print(f"{name:34s} ppl {row['ppl']:8.2f}  ({row['ppl_seconds']}s)", flush=True)
    if want_tasks:
        t0 = time.perf_counter()
        row["tasks"] = dev_accuracy(model, tok, DEV_TASKS, tasks_dir(args), args.task_limit)  # acc_norm: ARC, OBQA
        row["acc_mean"] = mean(row["tasks"])
        row["task_limit"] = args.task_limit
        row["task_seconds"] = round(time.perf_counter() - t0, 1)
        table.save()
        print(f"{name:34s} acc {row['acc_mean']:.3f} {row['tasks']}  ({row['task_seconds']}s)", flush=True)


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    from moekit.data import calibration_tokens
    from moekit.densify.densify import DensifyConfig, densify
    from moekit.checkpoint.save import save_model
    from moekit.densify.neuron_prune import NeuronPruneConfig, prune_neurons_
    from moekit.eval.perplexity import windows
    from moekit.train.distill import DistillConfig, distill_

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib, dev = args.calib, args.dev
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
            "model": args.model, "dense": args.dense, "ppl": f"first {args.ppl_tokens} tokens of {dev}, 1024 windows",
            "tasks": f"moekit.eval.harness.evaluate DEV_TASKS, first {args.task_limit} items each, 0-shot",
            "distill": {"steps": args.distill_steps, "batch": args.distill_batch, "seq_len": args.distill_seq,
                        "lr": args.distill_lr, "tokens": args.distill_steps * args.distill_batch * args.distill_seq,
                        "data": calib}}
    table = Table(out / "densify_table.json", meta)
    cache: dict = {}

    def get(name):  # models loaded once, on first need
        if name not in cache:
            cache[name] = load(name)
        return cache[name]

    tok = get(args.dense)[1]
    ppl_tokens = windows(tok, dev, max_tokens=args.ppl_tokens, window=1024)
    calib_tokens = calibration_tokens(calib, tok, n_seq=args.calib_seq, seq_len=args.calib_len, seed=0)
    dcfg = {"steps": args.distill_steps, "lr": args.distill_lr, "batch_size": args.distill_batch,
            "seq_len": args.distill_seq, "warmup_steps": max(args.distill_steps // 8, 1)}

    def build_control(width):
        m = load(args.dense)[0]
        prune_neurons_(m, NeuronPruneConfig(width=width), tokens=calib_tokens)
        return m

    def distilled(name, build, teacher_name):
        mdir = out / "models" / name.replace(" ", "_").replace("=", "").replace("+", "plus").replace(":", "")

        def make():
            if (mdir / "config.json").exists():
                return load(str(mdir))[0]
            student = build()
            rep = distill_(student, DistillConfig(**dcfg), tokens=calib, teacher=get(teacher_name)[0], tokenizer=tok)
            row = table.row(name)
            row["distill"] = {k_: rep[k_] for k_ in ("steps_run", "tokens_run", "seconds", "tokens_per_s")}
            row["distill"].update(teacher=teacher_name, loss_first=rep["losses"][0], loss_last=rep["losses"][-1])
            table.save()
            print(f"{name:34s} distilled {rep['tokens_run']} tokens in {rep['seconds']:.0f}s, "
                  f"KL {rep['losses'][0]:.3f} -> {rep['losses'][-1]:.3f}", flush=True)
            save_model(student, tok, mdir, overwrite=True)
            return student

        return make

    evaluate_row(table, f"dense ({args.dense})", lambda: get(args.dense)[0], tok, ppl_tokens, args)
    if args.control_only:
        for k, width in zip(args.ks, args.control_widths, strict=True):
            evaluate_row(table, f"K={k} control: {args.dense} pruned", lambda w=width: build_control(w), tok,
                         ppl_tokens, args, extra={"k": k, "score": "neuron-prune", "stage": "before"})
            if not args.no_distill and k in (args.distill_ks or args.ks):
                evaluate_row(table, f"K={k} control + distill", distilled(f"K={k} control + distill",
                             lambda w=width: build_control(w), args.dense), tok, ppl_tokens, args,
                             extra={"k": k, "stage": "after"})
        return report(table)

    teacher = get(args.model)[0]
    stats = _stats(out, args, teacher, tok)
    evaluate_row(table, f"MoE teacher ({args.model})", lambda: teacher, tok, ppl_tokens, args)

    def build_dense(k, score, **variant):
        return densify(teacher, DensifyConfig(keep=k, score=score, **variant), stats=stats)

    for k in args.ks:
        # 1. every score before distillation
        for score in args.scores:
            t0 = time.perf_counter()
            evaluate_row(table, f"K={k} {score}", lambda k=k, s=score: build_dense(k, s), tok, ppl_tokens, args,
                         extra={"k": k, "score": score, "stage": "before"})
            table.row(f"K={k} {score}").setdefault("densify_seconds", round(time.perf_counter() - t0, 1))
        if args.variants:  # the paper's other axes, on the best score by perplexity
            best = min((s for s in args.scores if s != "random"), key=lambda s: table.row(f"K={k} {s}")["ppl"])
            for label, variant in (("grouping=merge", {"grouping": "merge"}), ("down=score", {"down_scaling": "score"})):
                evaluate_row(table, f"K={k} {best} {label}", lambda k=k, s=best, v=variant: build_dense(k, s, **v), tok,
                             ppl_tokens, args, extra={"k": k, "score": best, "stage": "before", **variant})
        # 2. the control at the same FFN width
        width = table.row(f"K={k} {args.scores[0]}")["ffn_width"]
        evaluate_row(table, f"K={k} control: {args.dense} pruned", lambda w=width: build_control(w), tok,
                     ppl_tokens, args, extra={"k": k, "score": "neuron-prune", "stage": "before"})
        if args.no_distill or k not in (args.distill_ks or args.ks):
            continue
        # 3. distillation, same budget: the best scores by perplexity, random, and the control
        ranked = []  # by perplexity; a score that built the very same model as a better one is skipped
        for s in sorted((s for s in args.scores if s != "random"), key=lambda s: table.row(f"K={k} {s}")["ppl"]):
            ppl = table.row(f"K={k} {s}")["ppl"]  # the same experts in another order: equal up to float rounding
            if all(abs(ppl - table.row(f"K={k} {r}")["ppl"]) > 1e-6 * ppl for r in ranked):
                ranked.append(s)
        rand = ["random"] if "random" in args.scores else []
        chosen = ranked[:1] + rand + ranked[1 : args.distill_top]  # best, random, then the runner-up
        for s in chosen:
            name = f"K={k} {s} + distill"
            evaluate_row(table, name, distilled(name, lambda k=k, s=s: build_dense(k, s), args.model), tok,
                         ppl_tokens, args, extra={"k": k, "score": s, "stage": "after"})
        name = f"K={k} control + distill"
        evaluate_row(table, name, distilled(name, lambda w=width: build_control(w), args.dense), tok, ppl_tokens,
                     args, extra={"k": k, "stage": "after"})
        if args.control_moe_teacher:
            name = f"K={k} control + distill from the MoE"
            evaluate_row(table, name, distilled(name, lambda w=width: build_control(w), args.model), tok, ppl_tokens,
                         args, extra={"k": k, "stage": "after", "teacher": args.model})
    report(table)


def _stats(out: Path, args, teacher, tok):
    """The teacher's statistics with a --gram-token Gram matrix, cached in OUT."""
    from moekit.data import calibration_tokens
    from moekit.profile.profile import ProfileConfig

    tokens = calibration_tokens(args.calib, tok, n_seq=args.calib_seq, seq_len=args.calib_len, seed=0)
    path = out / f"{Path(args.model).name}.densify-stats.safetensors"
    return load_or_profile(teacher, tokens, path, ProfileConfig(gram_tokens=args.gram))


def report(table: Table) -> None:
    lines = ["| model | FFN width | params | ppl | acc (mean) | arc_e | obqa | siqa | distill |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in table.data["rows"].items():
        t = r.get("tasks") or {}
        d = r.get("distill")
        dist = f"{d['tokens_run']} tok, {d['seconds']:.0f}s, KL {d['loss_first']:.2f}->{d['loss_last']:.2f}" if d else ""
        acc = f"{r['acc_mean']:.3f}" if "acc_mean" in r else ""
        vals = [f"{v:.3f}" if v is not None else "" for v in t.values()] + [""] * (3 - len(t))
        lines.append(f"| {name} | {r.get('ffn_width') or 'MoE'} | {r.get('params', 0) / 1e6:.1f}M | {r.get('ppl', float('nan')):.2f} "
                     f"| {acc} | {' | '.join(vals[:3])} | {dist} |")
    text = "\n".join(lines)
    print(text)
    md = table.path.with_suffix(".md")
    md.write_text("# densify table\n\n" + json.dumps(table.data["meta"], indent=2) + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
