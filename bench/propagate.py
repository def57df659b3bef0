"""Error-propagating calibration against calibration on the original model, for pruning, merging, re-routing and
densifying (issue 20), on smollm2-moe.

One pass (the default of `moekit prune` / `merge` / `route` / `densify`): every layer's decisions (prune scores; merge
router rows and coefficients; the rescale constant; densify's expert scores) are computed on the original model's hidden states; for pruning one
statistics file serves every ratio. Error-propagating (`--propagate`): layer i's decisions are computed on the hidden
states the already compressed layers 0..i-1 produce, one extra layer forward per layer on the layer-sequential
engine. Same 16 x 512 calibration tokens and profile for every row, same evaluator (perplexity on the first 16,384
dev tokens, 1024-token windows).

Refit (``--methods refit``): the one-pass compressed model, then every MoE layer's down projections (routed and
shared) refitted by least squares, layer by layer on the hidden states the already refitted layers produce, to the
original model's FFN outputs on those states (`moekit heal COMPRESSED --teacher ORIGINAL --no-router
--local-epochs 0`: :func:`moekit.carve.heal.heal_` with the original MoE as the teacher). The model stays a standard
checkpoint of the same shape.

    python bench/propagate.py [--methods prune merge route densify refit]

Each row is appended to bench/results/propagate.jsonl as it finishes and a rerun skips the rows logged under the same
settings (``--fresh`` starts over); writes bench/results/tables/propagate.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import RESULTS, add_common, append_jsonl, load, load_or_profile, parse, parser, read_jsonl, write_json

ROWS = {  # method -> [(label, config maker)]
    "prune": [("REAP −25%", lambda: _prune(0.25)), ("REAP −50%", lambda: _prune(0.5)),
              ("top-6 count −25%", lambda: _prune(0.25, "topk_prime", top_k_prime=6)),
              ("frequency −25%", lambda: _prune(0.25, "frequency")), ("EAN −25%", lambda: _prune(0.25, "ean")),
              ("MSAN −25%", lambda: _prune(0.25, "msan")), ("probability mass −25%", lambda: _prune(0.25, "prob_mass")),
              ("weighted frequency −25%", lambda: _prune(0.25, "weighted_frequency"))],
    "merge": [("merge to 18", lambda: _merge(18)), ("merge to 12", lambda: _merge(12))],
    "route": [("top-4 of 8, rescale", lambda: _route(4))],
    "densify": [("K=8 acp", lambda: _densify(8)), ("K=4 acp", lambda: _densify(4))],
    # the compression of the row named, then the least-squares refit (see the docstring)
    "refit": [("REAP −25%", lambda: ("prune", _prune(0.25))), ("REAP −50%", lambda: ("prune", _prune(0.5))),
              ("merge to 18", lambda: ("merge", _merge(18))), ("merge to 12", lambda: ("merge", _merge(12))),
              ("top-4 of 8, rescale", lambda: ("route", _route(4)))],
}
REFIT = "one pass + lstsq refit to the original's layer outputs"


def _prune(ratio, criterion="reap", **kw):
    from moekit.prune.prune import PruneConfig

    return PruneConfig(criterion=criterion, ratio=ratio, **kw)


def _merge(target):
    from moekit.merge.merge import MergeConfig

    return MergeConfig(target=target)


def _route(k):
    from moekit.route.route import RouteConfig

    return RouteConfig(top_k=k, mitigations=("rescale",))


def _densify(keep):
    from moekit.densify.densify import DensifyConfig

    return DensifyConfig(keep=keep, score="acp")  # acp: do-acp without a Gram matrix (the profile has none)


def refit(model, what, stats, calib):
    """The compression ``what`` = (method, config) in memory, then the least-squares refit of the down projections
    toward ``model`` (:func:`moekit.carve.heal.heal_`, router and local steps off)."""
    import copy

    import torch

    from moekit.carve.heal import HealConfig, heal_

    method, cfg = what
    student = copy.deepcopy(model)
    with torch.no_grad():
        if method == "prune":
            from moekit.prune.prune import prune_

            prune_(student, cfg, stats=stats)
        elif method == "merge":
            from moekit.merge.merge import merge_

            merge_(student, cfg, stats=stats, tokens=calib)
        else:
            from moekit.route.route import route_

            route_(student, cfg, stats=stats, tokens=calib)
    heal_(student, HealConfig(router=False, lstsq=True, local_epochs=0), tokens=calib, teacher=model, progress=False)
    return student


def compress(method: str, cfg, src: str, out: Path, stats, calib, propagate: bool) -> None:
    """The layer-sequential path of each method, as `moekit prune/merge/route [--propagate]` runs it."""
    import torch

    kw = dict(stats=stats, device="cpu", dtype=torch.float32, progress=False)
    if method == "prune":
        from moekit.prune.sequential import prune_propagating, prune_sequential

        if propagate:
            prune_propagating(src, cfg, out, tokens=calib, **kw)
        else:
            prune_sequential(src, cfg, out, **kw)
    elif method == "merge":
        from moekit.merge.sequential import merge_sequential

        merge_sequential(src, cfg, out, tokens=calib, propagate=propagate, **kw)
    elif method == "route":
        from moekit.route.sequential import route_sequential

        route_sequential(src, cfg, out, tokens=calib, propagate=propagate, **kw)
    else:
        from moekit.densify.sequential import densify_sequential

        densify_sequential(src, cfg, out, tokens=calib, propagate=propagate, **kw)


def main() -> None:
    ap = add_common(parser(__doc__), out=None)
    ap.add_argument("--methods", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--n-seq", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--fresh", action="store_true", help="forget the rows logged under these settings")
    args = parse(ap)

    from moekit.checkpoint.load import local_checkpoint
    from moekit.data import calibration_tokens
    from moekit.eval.perplexity import perplexity, windows

    log = RESULTS / "propagate.jsonl"
    setup = {"model": args.model, "n_seq": args.n_seq, "seq_len": args.seq_len, "ppl_tokens": args.ppl_tokens,
             "calib": Path(args.calib).name}
    if args.fresh and log.exists():
        log.unlink()
    src = local_checkpoint(args.model, purpose="this benchmark")
    model, tok = load(args.model)
    calib = calibration_tokens(args.calib, tok, n_seq=args.n_seq, seq_len=args.seq_len, seed=0)
    dev = windows(tok, args.dev, max_tokens=args.ppl_tokens, window=1024)
    stats = load_or_profile(model, calib, RESULTS / "smollm2-moe.stats.safetensors" if args.model == "smollm2-moe" else None)
    done = {(x["method"], x["label"], x["how"]): x for x in read_jsonl(log) if x.get("setup") == setup}
    base = next((x["ppl"] for x in done.values() if x["method"] == "original"), None)
    if base is None:
        base = perplexity(model, dev, progress=False)
        append_jsonl(log, {"setup": setup, "method": "original", "label": "original", "how": "—", "ppl": base})
    if "refit" not in args.methods:
        del model
    print(f"original {base:.2f}", flush=True)
    for method in args.methods:
        for label, make in ROWS[method]:
            for how in ((REFIT,) if method == "refit" else ("one pass", "error-propagating")):
                if (method, label, how) in done:
                    print(f"{label}, {how}: from the log ({done[method, label, how]['ppl']:.2f})", flush=True)
                    continue
                t0 = time.perf_counter()
                if method == "refit":
                    student = refit(model, make(), stats, calib)
                    seconds = time.perf_counter() - t0
                else:
                    tmp = tempfile.TemporaryDirectory(dir=RESULTS)
                    compress(method, make(), src, Path(tmp.name) / "m", stats, calib, how != "one pass")
                    seconds = time.perf_counter() - t0
                    student, _ = load(str(Path(tmp.name) / "m"), with_tokenizer=False)
                    tmp.cleanup()  # the model is in memory now
                ppl = perplexity(student, dev, progress=False)
                del student
                rec = {"setup": setup, "method": method, "label": label, "how": how, "ppl": ppl, "seconds": seconds}
                print(rec, flush=True)
                append_jsonl(log, rec)
                done[method, label, how] = rec

    rows = [["original", "—", base, None, None, None]]
    for method in ROWS:
        for label, make in ROWS[method]:
            if method == "refit":  # compared with the same compression, one pass, without the refit
                x, one = done.get((method, label, REFIT)), done.get((make()[0], label, "one pass"))
                if x is not None:
                    command = f"`moekit {make()[0]}` {label}, then `moekit heal --no-router --local-epochs 0`"
                    rows.append([command, REFIT, x["ppl"], x["ppl"] / base - 1,
                                 x["ppl"] / one["ppl"] - 1 if one else None, x["seconds"]])
                continue
            one, prop = done.get((method, label, "one pass")), done.get((method, label, "error-propagating"))
            for how, x in (("one pass", one), ("error-propagating", prop)):
                if x is None:
                    continue
                flag = " --propagate" if how != "one pass" else ""
                gain = prop["ppl"] / one["ppl"] - 1 if (x is prop and one) else None
                rows.append([f"`moekit {method}` {label}{flag}", how, x["ppl"], x["ppl"] / base - 1, gain, x["seconds"]])
    write_json(RESULTS / "tables" / "propagate.json", {
        "title": "Error-propagating calibration against calibration on the original model",
        "command": "python bench/propagate.py",
        "model": f"{args.model} (24 routed experts per layer, top-8, 30 layers), fp32, layer-sequential paths",
        "data": f"{args.n_seq} x {args.seq_len} calibration tokens of {Path(args.calib).name} (seed 0) and one profile "
                f"of them for every row; perplexity on the first {args.ppl_tokens:,} tokens of {Path(args.dev).name}, "
                "1024-token windows; seconds: compression (and refit) only (the profile, shared by every row, not "
                "counted); refit rows compress in memory, the others on the layer-sequential path (the same model)",
        "machine": "2-core development CPU shared with other jobs, fp32, no GPU", "date": time.strftime("%Y-%m-%d"),
        "columns": ["command", "calibration", "perplexity", "vs original", "vs one pass", "seconds"],
        "formats": ["", "", ".2f", "+.1%", "+.1%", ".0f"], "rows": rows})


if __name__ == "__main__":
    main()
