"""CMoE on SmolLM2: perplexity vs share of FFN neurons active, for each router and healing step; carving time.

For each share (the paper's 0.75 / 0.5 / 0.25 / 0.125 sweep) the dense model is carved into N experts
(N_s shared) with N_k routed active so that (N_s + N_k) / N is the share, then healed one step at a time,
perplexity measured after each:

    carved    CMoE representative-neuron router, training-free (gates ~ 1)
    +router   router refitted in closed form (ridge on per-expert log output energy)
    +lstsq    + least-squares refit of the down projections
    +local    + layer-wise local reconstruction (``--local-epochs``)
    +distill  + end-to-end forward-KL distillation from the dense model (``--distill-steps`` x 4 calibration sequences)

Also: carving time (marker pass + partition, no loading or healing), the one-iteration vs converged
clustering at share 0.5, and the embedded default's recipe. Prints a table; writes JSON to --out.

    python bench/carve_sweep.py --out bench/results/carve_sweep.json
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import RESULTS, add_common, load, parse, parser, write_json


def main() -> None:
    ap = add_common(parser(__doc__), model="smollm2", out=RESULTS / "carve_sweep.json", out_help="JSON results file")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--dev-tokens", type=int, default=16384)
    ap.add_argument("--local-shares", default="0.5", help="shares that also get the (costly) local step")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--shares", default="0.5,0.25,0.75,0.125", help="most informative first: rows are saved as they finish")
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--distill-steps", type=int, default=20, help="at the --local-shares shares; 0 = skip")
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--skip-converged", action="store_true", help="skip the converged-clustering row")
    args = parse(ap)

    from moekit.carve.carve import CarveConfig, carve
    from moekit.data import calibration_tokens
    from moekit.carve.heal import HealConfig, heal_
    from moekit.eval.perplexity import perplexity, windows

    torch.manual_seed(0)
    dense, tok = load(args.model)
    calib = calibration_tokens(args.calib, tok, n_seq=args.calib_seqs, seq_len=args.calib_len, seed=0)
    dev = windows(tok, args.dev, max_tokens=args.dev_tokens, window=1024)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "calib_tokens": int(calib.numel()), "dev_tokens": int(dev.numel()),
              "threads": torch.get_num_threads(), "rows": []}

    def save():
        write_json(out, result)

    def ppl(model) -> float:
        return round(perplexity(model, dev, batch_size=4, progress=False), 2)

    t = time.perf_counter()
    result["dense_ppl"] = ppl(dense)
    print(f"dense perplexity {result['dense_ppl']} ({time.perf_counter() - t:.0f} s)", flush=True)
    save()
    n, ns = args.experts, args.shared
    n_routed = n - ns
    plans = []
    for share in (float(s) for s in args.shares.split(",")):
        nk = max(1, min(n_routed, round(share * n) - ns))
        plans.append((share, CarveConfig(experts=n, shared=ns, active=nk, iterations=1)))
    if not args.skip_converged:
        nk = round(0.5 * n) - ns
        plans.append((0.5, CarveConfig(experts=n, shared=ns, active=nk, iterations=0)))

    for _share, cfg in plans:
        t = time.perf_counter()
        moe = carve(dense, cfg, tokens=calib, progress=False)
        carve_s = time.perf_counter() - t
        row = {"share": round((cfg.shared + cfg.active) / cfg.experts, 4), "experts": cfg.experts, "shared": cfg.shared,
               "active": cfg.active, "iterations": cfg.iterations, "rounds_mean": sum(moe.config.moekit_carve["rounds"]) / len(moe.config.moekit_carve["rounds"]),
               "carve_s": round(carve_s, 1), "carve_cpu_s": moe.config.moekit_carve["cpu_seconds"], "ppl": {}, "heal_s": {}}
        result["rows"].append(row)  # saved as it fills, so an interrupted run keeps its partial rows
        row["ppl"]["carved"] = ppl(moe)
        print(f"share {row['share']} N_k {cfg.active} it {cfg.iterations}: carve {carve_s:.1f} s, carved ppl "
              f"{row['ppl']['carved']}", flush=True)
        save()
        if cfg.iterations == 0:  # converged-clustering row: training-free only
            continue
        steps = [("+router", HealConfig(router=True, lstsq=False, local_epochs=0)),
                 ("+lstsq", HealConfig(router=False, lstsq=True, local_epochs=0)),
                 ("+local", HealConfig(router=False, lstsq=False, local_epochs=args.local_epochs)),
                 ("+distill", HealConfig(router=False, lstsq=False, local_epochs=0, distill_steps=args.distill_steps,
                                         distill_lr=args.distill_lr, batch_size=4))]
        steps = [s for s in steps if (s[0] != "+local" or args.local_epochs > 0) and (s[0] != "+distill" or args.distill_steps > 0)]
        if row["share"] not in {float(s) for s in args.local_shares.split(",")}:
            steps = steps[:2]
        for name, hcfg in steps:
            t = time.perf_counter()
            heal_(moe, hcfg, tokens=calib, teacher=dense, progress=False)
            row["heal_s"][name] = round(time.perf_counter() - t, 1)
            row["ppl"][name] = ppl(moe)
            print(f"   {name}: ppl {row['ppl'][name]} (heal {row['heal_s'][name]} s)", flush=True)
            save()

    d = result["dense_ppl"]
    cols = ["carved", "+router", "+lstsq", "+local", "+distill"]
    print(f"\nperplexity / dense ({d}) on {result['dev_tokens']} tokens of {Path(args.dev).name}, "
          f"{result['calib_tokens']} calibration tokens, {args.experts} experts ({args.shared} shared)")
    print("share  N_k  iters  carve_s  " + "  ".join(f"{c:>8}" for c in cols))
    for r in sorted(result["rows"], key=lambda r: (-r["share"], r["iterations"] == 0)):
        vals = "  ".join(f"{r['ppl'][c] / d:8.2f}" if c in r["ppl"] else f"{'-':>8}" for c in cols)
        print(f"{r['share']:5.3f}  {r['active']:3d}  {r['iterations']:5d}  {r['carve_s']:7.1f}  {vals}")
    save()
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
