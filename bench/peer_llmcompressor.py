"""The peer: llm-compressor's REAP expert pruning against moekit's, same calibration tokens, one evaluator.

    python bench/peer_llmcompressor.py                   # smollm2-moe; -25% and -50% experts, uniform per layer

llm-compressor (``REAPPruningModifier``, 0.14.0.1) runs in its own environment (``moekit llmc-env``) through
``bench/peer_llmc_worker.py``: the checkpoint loaded with plain ``AutoModelForCausalLM.from_pretrained``, ``oneshot``
on a DataLoader over exactly the token ids moekit calibrates on (16 x 512 from the C4 train head, seed 0), with its
default ``propagate_error=True`` (each layer is scored on what the already pruned layers before it compute) and once
with ``propagate_error=False`` (every layer scored on the original model's activations). moekit, in process: one
profile of those tokens (``moekit.profile.profile``) and ``prune_(PruneConfig(criterion="reap", ratio=r))`` per
ratio; and, where this moekit has it, the error-propagating variant (``moekit.prune.sequential.prune_propagating``);
and merging to the same count of experts per layer (``merge_(MergeConfig(target=...))``, moekit merge's defaults).

Every pruned model is scored by the same evaluator, moekit's perplexity (``moekit.eval.perplexity``) on the first
16,384 tokens of the C4 dev file in 1024-token windows, in this process (fp32, CPU). llm-compressor's checkpoints are
read back with moekit's loader and checked against the source: each layer's kept experts are the source experts at
the indices llm-compressor reports (router rows and expert weights bit-identical), so the comparison is of the
choice of experts alone. Per row: perplexity, wall seconds of the compression (llm-compressor: ``oneshot``, with its
linearisation, tracing and calibration passes; moekit: the profile + the prune; model loading excluded on both sides),
experts kept per layer, and in how many layers the kept set equals moekit's one-pass REAP set and llm-compressor's
default (``propagate_error=True``) set at the same ratio.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.metadata as md
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import add_common, append_jsonl, load, parse, parser, read_jsonl, write_json

WORKER = Path(__file__).with_name("peer_llmc_worker.py")


def kept_of(report: dict) -> dict[int, list[int]]:
    """{decoder layer: kept source experts, in the order the pruned layer holds them} from a moekit prune report."""
    return {int(r["layer"]): [int(e) for e in (r["kept"] if r["kept"] is not None else range(r["experts_before"]))]
            for r in report["layers"]}


def same_layers(a: dict[int, list[int]] | None, b: dict[int, list[int]] | None) -> str:
    if not a or not b:
        return "–"
    same = sum(1 for layer in a if sorted(a[layer]) == sorted(b.get(layer, [])))
    return f"{same}/{len(a)}"


def per_layer(kept: dict[int, list[int]]) -> str:
    counts = sorted({len(v) for v in kept.values()})
    return "/".join(str(c) for c in counts)


EXPERT_KEY = re.compile(r"layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")


def source_subset(model, source, kept: dict[int, list[int]]) -> tuple[int, float]:
    """Compare every tensor of the pruned ``model`` with the source's: routed-expert tensors and router rows at the
    kept indices, everything else whole. (tensors that differ or are missing, largest absolute difference); (0, 0.0)
    means the model is exactly the source with those experts kept, so its perplexity is a function of ``kept``."""
    want_sd, bad, worst = source.state_dict(), 0, 0.0
    got_sd = model.state_dict()
    bad += len(set(want_sd) ^ set(got_sd))
    for name, got in got_sd.items():
        if name not in want_sd:
            continue
        want = want_sd[name]
        m = EXPERT_KEY.search(name)
        if m and int(m.group(1)) in kept:
            want = want[kept[int(m.group(1))]]
        if got.shape != want.shape:
            bad, worst = bad + 1, float("inf")
        elif not torch.equal(got, want):
            bad, worst = bad + 1, max(worst, float((got.float() - want.float()).abs().max()))
    return bad, worst


def main(argv=None) -> None:
    ap = add_common(parser(__doc__))
    ap.add_argument("--ratios", default="0.25,0.5", help="fractions of routed experts removed, comma-separated")
    ap.add_argument("--no-propagate-ratios", default="0.25",
                    help="ratios also run with llm-compressor's propagate_error=False ('' for none)")
    ap.add_argument("--n-seq", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=16384, help="dev tokens scored (1024-token windows)")
    ap.add_argument("--llmc-python", default=None)
    ap.add_argument("--all-experts", action="store_true",
                    help="llm-compressor's moe_calibrate_all_experts=True (its oneshot default: every expert runs on "
                         "every calibration token; REAP's saliency is the same, only slower)")
    ap.add_argument("--rescore", action="store_true",
                    help="score every row, even one whose model is tensor for tensor one an earlier row scored")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows logged by an earlier, interrupted run")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds one llm-compressor run may take")
    args = parse(ap, argv)

    from safetensors.torch import save_file

    from moekit.checkpoint.load import resolve
    from moekit.data import calibration_tokens
    from moekit.eval.perplexity import perplexity, windows
    from moekit.profile.profile import ProfileConfig, profile
    from moekit.profile.stats import ExpertStats, fingerprint, super_experts
    from moekit.merge.merge import MergeConfig, merge_
    from moekit.prune.prune import PruneConfig, prune_
    from moekit.serve.envs import run_worker
    from moekit.serve.quantize import find_llmc_python

    try:
        from moekit.prune.sequential import prune_propagating
    except ImportError:
        prune_propagating = None

    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    noprop = [float(r) for r in args.no_propagate_ratios.split(",") if r.strip()]
    llmc_py = find_llmc_python(args.llmc_python)
    src = Path(resolve(args.model))
    t_all = time.perf_counter()

    model, tok = load(args.model)
    calib = calibration_tokens(args.calib, tok, n_seq=args.n_seq, seq_len=args.seq_len, seed=0)
    dev = windows(tok, args.dev, max_tokens=args.tokens, window=1024)
    n_experts = model.config.num_experts
    print(f"{args.model}: {src}; calibration {tuple(calib.shape)}, dev {tuple(dev.shape)}; "
          f"{n_experts} routed experts, top-{model.config.num_experts_per_tok}", flush=True)

    # rows are logged as they finish; a rerun with the same model and tokens picks up where the last one stopped
    out = Path(args.out)
    log, stats_file = out / "peer_llmcompressor.jsonl", out / "peer_llmcompressor_stats.safetensors"
    setup = hashlib.sha1(b"".join([fingerprint(model).encode(), calib.numpy().tobytes(), dev.numpy().tobytes(),
                                   str(args.all_experts).encode()])).hexdigest()[:16]
    if args.fresh and log.exists():
        log.unlink()
    done = {(x["key"], x.get("ratio")): x for x in read_jsonl(log) if x.get("setup") == setup}
    if done:
        print(f"resuming: {len(done)} rows from {log}", flush=True)

    def record(x: dict) -> dict:
        out.mkdir(parents=True, exist_ok=True)
        append_jsonl(log, {**x, "setup": setup, "kept": {str(k): v for k, v in x.get("kept", {}).items()}})
        return x

    def logged(key: str, ratio=None) -> dict | None:
        x = done.get((key, ratio))
        if x is not None:
            x = {**x, "kept": {int(k): v for k, v in x.get("kept", {}).items()}}
            value = f"perplexity {x['ppl']:.2f}" if "ppl" in x else f"{x['seconds']:.1f} s"
            print(f"  {x.get('label', key)}: from the log ({value})", flush=True)
        return x

    def kept_key(kept: dict[int, list[int]]) -> tuple:
        return tuple(sorted((int(k), tuple(v)) for k, v in kept.items()))

    scored: dict[tuple, tuple[float, str]] = {}  # kept sets -> (perplexity, the row that measured it)
    for x in done.values():
        if x.get("kept") and not x.get("scored_as") and x.get("check", {}).get("tensors_differing_from_source_subset") == 0:
            scored.setdefault(kept_key({int(k): v for k, v in x["kept"].items()}), (x["ppl"], x["label"]))

    def ppl(m, what: str, kept: dict[int, list[int]] | None = None) -> dict:
        """moekit's perplexity of ``m``; a model that is exactly the source with ``kept`` experts (checked tensor by
        tensor) and whose kept sets an earlier row already scored gets that score (the same weights give the same
        number; --rescore measures it again)."""
        check = {}
        if kept is not None:
            bad, worst = source_subset(m, model, kept)
            check = {"tensors_differing_from_source_subset": bad, "max_abs_diff": worst}
            if bad == 0 and kept_key(kept) in scored and not args.rescore:
                value, first = scored[kept_key(kept)]
                print(f"  {what}: the same model as '{first}' (checked tensor by tensor): {value:.2f}", flush=True)
                return {"ppl": value, "scored_as": first, "check": check}
        start = time.perf_counter()
        value = perplexity(m, dev, progress=False)
        seconds = time.perf_counter() - start
        print(f"  {what}: perplexity {value:.2f} ({seconds:.0f} s)", flush=True)
        if kept is not None and check["tensors_differing_from_source_subset"] == 0:
            scored.setdefault(kept_key(kept), (value, what))
        return {"ppl": value, "check": check, "eval_s": seconds}

    results: list[dict] = []  # one per row: method, ratio, ppl, seconds, kept
    base = logged("unpruned") or record({"key": "unpruned", "ratio": None, "label": "unpruned",
                                         **ppl(model, "unpruned")})
    base_ppl = base["ppl"]

    # ---- moekit, one pass: profile once, prune per ratio
    prof = logged("profile")
    if prof is not None and stats_file.exists():
        stats, profile_s = ExpertStats.load(stats_file), prof["seconds"]
    else:
        start = time.perf_counter()
        stats = profile(model, ProfileConfig(progress=False), tokens=calib)
        profile_s = time.perf_counter() - start
        stats.save(stats_file, overwrite=True)
        record({"key": "profile", "ratio": None, "label": "moekit profile", "seconds": profile_s})
    supers = super_experts(stats)
    print(f"moekit profile: {profile_s:.1f} s; super experts (kept by moekit): {supers}", flush=True)
    for r in ratios:
        label = f"moekit reap -{r:.0%}"
        x = logged("moekit", r)
        if x is None:
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            report = prune_(pruned, PruneConfig(criterion="reap", ratio=r), stats=stats)
            prune_s = time.perf_counter() - start
            kept = kept_of(report)
            x = record({"method": "moekit reap", "key": "moekit", "ratio": r, "label": label,
                        "seconds": profile_s + prune_s, "detail": {"profile_s": profile_s, "prune_s": prune_s},
                        "kept": kept, **ppl(pruned, label, kept)})
            del pruned
        results.append(x)

    # ---- moekit, merging to the same expert count instead of pruning (moekit merge's defaults: REAM grouping,
    # the select rule, router rows chosen per layer on held-back calibration tokens)
    for r in ratios:
        label = f"moekit merge -{r:.0%}"
        x = logged("moekit-merge", r)
        if x is None:
            merged = copy.deepcopy(model)
            target = n_experts - round(r * n_experts)
            start = time.perf_counter()
            merge_(merged, MergeConfig(target=target), stats=stats, tokens=calib)
            merge_s = time.perf_counter() - start
            x = record({"method": "moekit merge (REAM + select)", "key": "moekit-merge", "ratio": r, "label": label,
                        "experts": target, "seconds": profile_s + merge_s,
                        "detail": {"profile_s": profile_s, "merge_s": merge_s}, **ppl(merged, label)})
            del merged
        results.append(x)

    with tempfile.TemporaryDirectory(prefix="peer-llmc-") as tmp:
        tmp = Path(tmp)
        # ---- moekit, error-propagating (if this moekit has it)
        for r in ratios if prune_propagating is not None else []:
            label = f"moekit reap propagate -{r:.0%}"
            x = logged("moekit-prop", r)
            if x is None:
                where = tmp / f"moekit-prop-{r}"
                start = time.perf_counter()
                try:
                    report = prune_propagating(src, PruneConfig(criterion="reap", ratio=r), where, stats=stats,
                                               tokens=calib, device="cpu", progress=False)
                except Exception as e:  # a variant another change may still be shaping: say so, keep the rest
                    print(f"{label}: {type(e).__name__}: {e}", flush=True)
                    results.append({"method": "moekit reap, propagate", "key": "moekit-prop", "ratio": r,
                                    "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                seconds = time.perf_counter() - start
                pruned, _ = load(str(where), with_tokenizer=False)
                kept = kept_of(report)
                x = record({"method": "moekit reap, propagate", "key": "moekit-prop", "ratio": r, "label": label,
                            "seconds": profile_s + seconds, "kept": kept,
                            "detail": {"profile_s": profile_s, "prune_propagating_s": seconds},
                            **ppl(pruned, label, kept)})
                del pruned
                shutil.rmtree(where)
            results.append(x)

        # ---- llm-compressor, in its own environment: one worker per run
        tokens_file = tmp / "calibration.safetensors"
        save_file({"input_ids": calib.contiguous()}, str(tokens_file))
        for r, prop in [(r, True) for r in ratios] + [(r, False) for r in noprop]:
            key, label = ("llmc" if prop else "llmc-noprop"), f"llm-compressor propagate_error={prop} -{r:.0%}"
            x = logged(key, r)
            if x is None:
                where = tmp / f"{key}-{r}"
                request = {"model": str(src), "tokens": str(tokens_file), "moe_calibrate_all_experts": args.all_experts,
                           "threads": torch.get_num_threads(),
                           "runs": [{"name": key, "sparsity": r, "propagate_error": prop, "out": str(where)}]}
                print(f"{label}: llm-compressor ({llmc_py}) ...", flush=True)
                response = run_worker([str(llmc_py), str(WORKER)], request, timeout_s=args.timeout,
                                      what="llm-compressor REAP worker")
                if "error" in response:
                    sys.exit(f"llm-compressor REAP worker: {response['error']}")
                got = response["runs"][key]
                print(f"  oneshot {got['oneshot_seconds']:.0f} s", flush=True)
                pruned, _ = load(str(where), with_tokenizer=False)
                kept = {int(k): [int(e) for e in v] for k, v in got["kept"].items()}  # in the checkpoint's order
                versions = {k: response[k] for k in ("llmcompressor", "compressed_tensors", "transformers", "torch")}
                x = record({"method": f"llm-compressor REAP, propagate_error={prop}", "key": key, "ratio": r,
                            "label": label, "seconds": got["oneshot_seconds"], "kept": kept,
                            "detail": {**{k: v for k, v in got.items() if k != "kept"}, "versions": versions},
                            **ppl(pruned, label, kept)})
                del pruned
                shutil.rmtree(where)
            results.append(x)

    # ---- the table
    def find(key: str, r: float):
        return next((x for x in results if x["key"] == key and x["ratio"] == r and "kept" in x), None)

    rows = [["unpruned", "0%", f"{n_experts}", f"{base_ppl:.2f}", "–", "–", "–"]]
    order = {"moekit": 0, "moekit-prop": 1, "moekit-merge": 2, "llmc": 3, "llmc-noprop": 4}
    for x in sorted(results, key=lambda x: (x["ratio"], order[x["key"]])):
        if "error" in x:
            rows.append([x["method"], f"-{x['ratio']:.0%}", "–", "–", "–", "–", "–"])
            continue
        ref_m, ref_l = find("moekit", x["ratio"]), find("llmc", x["ratio"])
        same_model = f" (the model of '{x['scored_as']}')" if x.get("scored_as") else ""
        if not x.get("kept"):  # merged: no source expert is kept as it was
            rows.append([x["method"], f"-{x['ratio']:.0%}", str(x["experts"]), f"{x['ppl']:.2f}",
                         f"{x['seconds']:.1f}", "–", "–"])
            continue
        rows.append([x["method"], f"-{x['ratio']:.0%}", per_layer(x["kept"]), f"{x['ppl']:.2f}{same_model}",
                     f"{x['seconds']:.1f}",
                     same_layers(x["kept"], ref_m and ref_m["kept"]), same_layers(x["kept"], ref_l and ref_l["kept"])])
    columns = ["method", "experts removed", "kept per layer", "perplexity", "compression s",
               "same kept set as moekit reap (layers)", "same kept set as llm-compressor default (layers)"]
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")

    llmc_versions = next((x["detail"]["versions"] for x in results if x["key"].startswith("llmc")), {})
    resumed = sorted({x["label"] for x in done.values()})
    write_json(out / "tables" / "peer_llmcompressor.json", {
        "title": "The peer: llm-compressor's REAPPruningModifier vs moekit's REAP pruning and merging, one evaluator",
        "command": "python bench/peer_llmcompressor.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": f"{args.model} ({src.name}: Qwen2-MoE, {model.config.num_hidden_layers} layers, {n_experts} routed "
                 f"experts, top-{model.config.num_experts_per_tok}, a shared expert); the same count of experts "
                 "removed in every layer",
        "data": f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens of {Path(args.calib).name} "
                f"(moekit.data.calibration_tokens, seed 0), the same token ids for both; perplexity: moekit's, "
                f"first {dev.numel():,} tokens of {Path(args.dev).name} in 1024-token windows, fp32",
        "machine": f"2-core development CPU shared with other work ({platform.machine()}), so the seconds are rough; "
                   f"moekit: torch {md.version('torch')}, transformers {md.version('transformers')}; llm-compressor "
                   f"{llmc_versions.get('llmcompressor')} (compressed-tensors {llmc_versions.get('compressed_tensors')}, "
                   f"transformers {llmc_versions.get('transformers')}, torch {llmc_versions.get('torch')}) in its own "
                   f"environment, moe_calibrate_all_experts={args.all_experts}",
        "recorded": datetime.date.today().isoformat(),
        "columns": columns, "formats": [""] * len(columns), "rows": rows,
        "notes": ["compression s: llm-compressor's oneshot (linearising the experts, tracing, a calibration and, "
                  "with propagate_error, a propagation pass per layer, the pruning); moekit's profile (one pass, "
                  "shared by both ratios) + prune_; the propagating moekit row adds prune_propagating (the profile "
                  "gives it the super experts), which reads the checkpoint layer by layer and writes the pruned one. "
                  "Loading the model is excluded on both sides.",
                  "moekit merge: the same count of experts per layer as pruning leaves, made by merging (REAM "
                  "grouping around the REAP-salient experts, the select rule, router rows chosen per layer on "
                  "held-back calibration tokens: moekit merge's defaults), from the same profile; seconds: the "
                  "profile + merge_.",
                  "moekit keeps super experts by default (arXiv 2507.23279); here: "
                  f"{[list(s) for s in supers] or 'none'}.",
                  "every pruned model is checked tensor by tensor against the source with its kept experts "
                  "(check in raw: 0 tensors differ for all); a row whose kept sets equal an earlier row's is then the "
                  "same model and takes that row's perplexity (scored_as in raw) instead of a second identical "
                  "evaluation (--rescore evaluates it again)."]
                 + ([f"resumed from {log.name} after an interruption: {', '.join(resumed)} were measured by the "
                     "interrupted run (same model, tokens and code)"] if resumed else []),
        "raw": {"unpruned_ppl": base_ppl, "profile_s": profile_s, "seconds_this_run": time.perf_counter() - t_all,
                "llmc_versions": llmc_versions,
                "results": [{**x, "kept": {str(k): v for k, v in x.get("kept", {}).items()}} for x in results]}})
    print(f"\n{time.perf_counter() - t_all:.0f} s in all; wrote {out / 'tables' / 'peer_llmcompressor.json'}")


if __name__ == "__main__":
    main()
