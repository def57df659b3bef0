"""Error-propagating pruning against profile-once pruning on smollm2-moe (issue 20).

Profile once (`moekit profile` + `moekit prune`): every layer is scored on the unpruned model's activations; one
statistics file serves every ratio. Error-propagating (`moekit prune --propagate`): layer i is scored on the hidden
states the already pruned layers 0..i-1 produce (what llm-compressor's REAP does by default), one pass per ratio.
Same 16 x 512 calibration tokens, same evaluator (perplexity on the first 16,384 tokens of the dev text).

    python bench/prune_propagate.py [--criteria reap frequency] [--ratios 0.25 0.5]

Writes bench/results/tables/prune_propagate.json (and the log bench/results/prune_propagate.jsonl).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import RESULTS, add_common, append_jsonl, load, parse, parser, write_json


def main() -> None:
    ap = add_common(parser(__doc__), out=None)
    ap.add_argument("--criteria", nargs="+", default=["reap"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--n-seq", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    args = parse(ap)

    import torch

    from moekit.checkpoint.load import local_checkpoint
    from moekit.data import calibration_tokens
    from moekit.eval.perplexity import perplexity, windows
    from moekit.profile.profile import ProfileConfig, profile
    from moekit.prune.prune import PruneConfig
    from moekit.prune.sequential import prune_propagating, prune_sequential

    log = RESULTS / "prune_propagate.jsonl"
    src = local_checkpoint(args.model, purpose="this benchmark")
    model, tok = load(args.model)
    calib = calibration_tokens(args.calib, tok, n_seq=args.n_seq, seq_len=args.seq_len, seed=0)
    dev = windows(tok, args.dev, max_tokens=args.ppl_tokens, window=1024)
    t0 = time.perf_counter()
    stats = profile(model, ProfileConfig(progress=False), tokens=calib)
    profile_s = time.perf_counter() - t0
    base = perplexity(model, dev, progress=False)
    del model
    rows = [["unpruned", "—", base, None, None]]
    print(f"unpruned {base:.2f}; profile {profile_s:.0f} s", flush=True)
    for criterion in args.criteria:
        for ratio in args.ratios:
            for how in ("profile once", "error-propagating"):
                cfg = PruneConfig(criterion=criterion, ratio=ratio)
                with tempfile.TemporaryDirectory(dir=RESULTS) as tmp:
                    t0 = time.perf_counter()
                    if how == "profile once":
                        prune_sequential(src, cfg, Path(tmp) / "m", stats=stats, device="cpu", dtype=torch.float32,
                                         progress=False)
                    else:
                        prune_propagating(src, cfg, Path(tmp) / "m", stats=stats, tokens=calib, device="cpu",
                                          dtype=torch.float32, progress=False)
                    seconds = time.perf_counter() - t0 + (profile_s if how == "profile once" else 0.0)
                    pruned, _ = load(str(Path(tmp) / "m"), with_tokenizer=False)
                    ppl = perplexity(pruned, dev, progress=False)
                rec = {"criterion": criterion, "ratio": ratio, "how": how, "ppl": ppl, "seconds": seconds,
                       "vs_unpruned": ppl / base - 1}
                print(rec, flush=True)
                append_jsonl(log, rec)
                flag = " --propagate" if how != "profile once" else ""
                rows.append([f"{criterion}, −{ratio:.0%}{flag}", how, ppl, ppl / base - 1, seconds])
    write_json(RESULTS / "tables" / "prune_propagate.json", {
        "title": "Error-propagating pruning against profile-once pruning",
        "command": "python bench/prune_propagate.py --criteria " + " ".join(args.criteria),
        "model": "smollm2-moe (24 routed experts per layer, top-8, 30 layers), fp32",
        "data": f"{args.n_seq} x {args.seq_len} calibration tokens of calib/c4_train_head.jsonl; perplexity on the first "
                f"{args.ppl_tokens:,} tokens of dev/c4_valid_dev.jsonl; time: compression only (profile-once rows "
                "include the one profile pass, which serves every ratio)",
        "machine": "2-core development CPU shared with other jobs, fp32, no GPU", "date": time.strftime("%Y-%m-%d"),
        "columns": ["pruning", "calibration", "perplexity", "vs unpruned", "seconds"],
        "formats": ["", "", ".2f", "+.1%", ".0f"], "rows": rows})


if __name__ == "__main__":
    main()
