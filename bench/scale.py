"""Every command at Qwen3-30B-A3B scale, one decoder layer at a time (issue 17).

Four measurements, in one run:

depth  Synthetic checkpoints with Qwen3-30B-A3B's exact config (hidden 2048, 128 experts of 768, top-8, vocab
       151,936, bf16 shards; random weights) and N decoder layers, for each N of --layers. Every command runs with
       --mode sequential --dtype bfloat16 in its own process; its peak resident memory above the import baseline
       (torch, transformers and moekit imported) is recorded, with peak / one decoder layer's bf16 bytes and
       peak(largest N) / peak(smallest N). Each output is checked by `moekit info` (config against the shards).
fp8    The same checkpoint in the FP8 layout of the Qwen3 FP8 releases (128x128 block scales), smallest N:
       profile, prune and ppl, read dequantized one layer at a time.
cap    A checkpoint of --cap-layers layers (12: about 16 GB) under a cgroup-v1 memory limit of --cap-gib (needs
       root): profile -> prune -> merge -> route -> densify -> ppl, each to exit 0, then each written checkpoint's
       perplexity computed layer by layer under the same cap (it reads every tensor back).
time   The embedded default `smollm2-moe`: layer-sequential profile against in-memory profile (load + profile) on
       the same tokens, fp32, alternating, median of --repeats; and the largest difference between the statistics.

    python bench/scale.py                       # all four; about an hour on 2 cores, ~45 GB of free disk at peak
    python bench/scale.py --only time depth --layers 4 8

Results: bench/results/scale.jsonl (one record per command run, as they finish) and bench/results/tables/scale_*.json
(rendered into bench/README.md by bench/render.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, add_common, append_jsonl, parse, parser, read_jsonl, write_json

SEQ = ["--mode", "sequential", "--dtype", "bfloat16", "--device", "cpu"]
CGROUP = Path("/sys/fs/cgroup/memory/moekit-scale")
# run in the measured process: the import baseline, then the command, then the peak (ru_maxrss, KiB on Linux)
CHILD = r"""
import json, os, resource, sys
import torch, transformers, moekit.cli
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
code, out = 0, sys.argv[1]
try:
    sys.argv = ["moekit"] + sys.argv[2:]
    moekit.cli.main()
except SystemExit as e:
    code = e.code or 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
json.dump({"base": base, "peak": peak, "code": code}, open(out, "w"))
sys.exit(code)
"""


def commands(src: Path, work: Path, calib: str, dev: str) -> list[tuple[str, list[str], Path | None]]:
    """(name, moekit arguments, output checkpoint or None) of the chain, in order."""
    stats = work / "stats.safetensors"
    calib_args = ["--data", calib, "--n-seq", "8", "--seq-len", "128"]
    return [
        ("profile", ["profile", str(src), *calib_args, "--out", str(stats), "--overwrite"], None),
        ("prune -25%", ["prune", str(src), "--stats", str(stats), "--ratio", "0.25", "--out", str(work / "pruned")],
         work / "pruned"),
        ("merge 128->96", ["merge", str(src), "--stats", str(stats), "--target", "96", "--out", str(work / "merged")],
         work / "merged"),
        ("route 8->4 rescale", ["route", str(src), "--stats", str(stats), "--top-k", "4", "-m", "rescale", *calib_args,
                                "--out", str(work / "routed")], work / "routed"),
        ("densify K=2", ["densify", str(src), "--stats", str(stats), "--keep", "2", "--score", "reap",
                         "--out", str(work / "dense")], work / "dense"),
        ("ppl", ["ppl", str(src), "--data", dev, "--max-tokens", "2048", "--window", "512"], None),
    ]


def run(argv: list[str], cap: bool = False) -> dict:
    """One moekit command in its own process (inside the capped cgroup when ``cap``): exit code, wall time, peak RSS
    above the import baseline, and the cgroup's own peak (page cache included) when capped."""
    result = RESULTS / ".scale-child.json"
    cmd = [sys.executable, "-c", CHILD, str(result), *argv]
    if cap:
        (CGROUP / "memory.max_usage_in_bytes").write_text("0")
        cmd = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    rec = {"argv": argv, "code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "stdout_tail": proc.stdout.strip().splitlines()[-2:], "stderr_tail": proc.stderr.strip().splitlines()[-3:]}
    if result.exists() and proc.returncode == 0:
        child = json.loads(result.read_text())
        rec.update(base_gib=child["base"] / 2**30, peak_gib=child["peak"] / 2**30,
                   above_base_gib=(child["peak"] - child["base"]) / 2**30)
    result.unlink(missing_ok=True)
    if cap:
        rec["cgroup_peak_gib"] = int((CGROUP / "memory.max_usage_in_bytes").read_text()) / 2**30
    return rec


def synthetic(path: Path, layers: int, fp8: bool = False) -> Path:
    if not (path / "config.json").exists():
        args = [sys.executable, "-m", "moekit.checkpoint.synthetic", str(path), "--layers", str(layers),
                "--tokenizer-from", "smollm2-moe", "--device", "cpu"] + (["--fp8"] if fp8 else [])
        subprocess.run(args, check=True, cwd=ROOT)
    return path


def layer_gib(path: Path) -> float:
    """One decoder layer's bytes in bf16 (the largest layer), from the config on the meta device."""
    from moekit.checkpoint.read import skeleton
    from moekit.core.arch import decoder_layers

    layers = decoder_layers(skeleton(path))
    return max(sum(p.numel() for p in layer.parameters()) for layer in layers) * 2 / 2**30


def checks_out(out: Path) -> bool:
    """`moekit info` on a written checkpoint: its config builds and every shard's header matches it."""
    code = "import sys, moekit.cli; sys.argv = ['moekit', 'info', sys.argv[1]]; moekit.cli.main()"
    return subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, cwd=ROOT).returncode == 0


def chain(args, src: Path, work: Path, label: str, only: tuple[str, ...] | None = None, cap: bool = False) -> list[dict]:
    rows = []
    work.mkdir(parents=True, exist_ok=True)
    for name, argv, out in commands(src, work, args.calib, args.dev):
        if only and name.split()[0] not in only:
            continue
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        rec = {"experiment": label, "command": name, "layers": args.current_layers, **run(argv + SEQ, cap=cap)}
        if out is not None and rec["code"] == 0:
            rec["info_ok"] = checks_out(out)
            if cap:  # every tensor read back through the model, under the same cap
                ppl = run(["ppl", str(out), "--data", args.dev, "--max-tokens", "1024", "--window", "512"] + SEQ, cap=True)
                rec.update(readback_code=ppl["code"], readback_above_base_gib=ppl.get("above_base_gib"),
                           readback_ppl=next((line for line in ppl["stdout_tail"] if "perplexity" in line), None))
            shutil.rmtree(out, ignore_errors=True)  # disk: every output of a 16 GB model is several GB
        print(json.dumps(rec), flush=True)
        append_jsonl(args.log, rec)
        rows.append(rec)
    return rows


def make_cgroup(gib: float) -> None:
    if not CGROUP.parent.exists():
        raise SystemExit(f"{CGROUP.parent} is missing: the cap needs cgroup v1's memory controller (run as root)")
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(str(int(gib * 2**30)))


def time_profile(args) -> dict:
    """Layer-sequential vs in-memory profile of smollm2-moe on the same tokens; statistics compared."""
    import statistics

    import torch

    from moekit.checkpoint.load import load_model, local_checkpoint
    from moekit.data import calibration_tokens
    from moekit.profile.profile import ProfileConfig, profile
    from moekit.profile.stream import profile_stream

    torch.set_num_threads(os.cpu_count() or 1)
    path = local_checkpoint("smollm2-moe", purpose="the timing")
    _, tok = load_model("smollm2-moe", dtype="float32", device="cpu")
    tokens = calibration_tokens(args.calib, tok, n_seq=16, seq_len=512, seed=0)
    cfg = ProfileConfig(progress=False)
    mem_t, seq_t = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model, _ = load_model("smollm2-moe", dtype="float32", device="cpu")
        mem = profile(model, cfg, tokens=tokens)
        mem_t.append(time.perf_counter() - t0)
        del model
        t0 = time.perf_counter()
        seq = profile_stream(path, tokens, cfg, device="cpu", dtype=torch.float32)
        seq_t.append(time.perf_counter() - t0)
    diff = max(float((seq.tensors[k].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-30))
               for k, v in mem.tensors.items() if v.numel())
    rec = {"experiment": "time", "tokens": int(tokens.numel()), "memory_s": statistics.median(mem_t),
           "sequential_s": statistics.median(seq_t), "ratio": statistics.median(seq_t) / statistics.median(mem_t),
           "max_relative_difference": diff, "same_keys": sorted(mem.tensors) == sorted(seq.tensors),
           "runs": {"memory": mem_t, "sequential": seq_t}}
    print(json.dumps(rec), flush=True)
    append_jsonl(args.log, rec)
    return rec


def tables(args) -> None:
    """bench/results/tables/scale_*.json from the log (the last record of each experiment, command and N)."""
    recs = read_jsonl(args.log)
    machine = "2-core development CPU, bf16 compute, no GPU"
    depth = {}
    for r in recs:
        if r["experiment"] in ("depth", "fp8"):
            depth[(r["experiment"], r["command"], r["layers"])] = r
    ns = sorted({n for e, _, n in depth if e == "depth"})
    if ns:
        layer = args.layer_gib
        order = [name for name, _, _ in commands(Path("."), Path("."), "", "")]
        rows = []
        for e in ("depth", "fp8"):
            for c in order:
                runs = [depth.get((e, c, n)) for n in ns]
                if not any(runs):
                    continue
                peaks = [r.get("above_base_gib") if r else None for r in runs]
                known = [p for p in peaks if p is not None]
                ok = all(r["code"] == 0 and r.get("info_ok", True) for r in runs if r)
                rows.append([f"{c}{' (FP8 source)' if e == 'fp8' else ''}", *peaks,
                             known[-1] / known[0] if len(known) > 1 else None, max(known) / layer if known else None,
                             "yes" if ok else "no"])
        write_json(RESULTS / "tables" / "scale_depth.json", {
            "title": "Peak memory does not grow with depth (Qwen3-30B-A3B config, N decoder layers)",
            "command": "python bench/scale.py --only depth fp8 --layers " + " ".join(map(str, ns)),
            "model": f"synthetic Qwen3-30B-A3B (exact config, random bf16 weights), N layers; one decoder layer is "
                     f"{layer:.2f} GiB in bf16",
            "data": "8 x 128 calibration tokens of calib/c4_train_head.jsonl; ppl: 2,048 tokens of dev/c4_valid_dev.jsonl;"
                    " peak RSS above the import baseline (torch, transformers, moekit), one process per command",
            "machine": machine, "date": time.strftime("%Y-%m-%d"),
            "columns": ["command (--mode sequential)", *[f"N={n}: peak GiB" for n in ns], f"peak N={ns[-1]} / N={ns[0]}",
                        "peak / one layer", "exit 0, output checks"],
            "formats": ["", *[".2f"] * len(ns), ".3f", ".2f", ""], "rows": rows})
    cap = list({r["command"]: r for r in recs if r["experiment"] == "cap"}.values())  # the last run of each
    if cap:
        write_json(RESULTS / "tables" / "scale_cap.json", {
            "title": f"Under a hard memory cap ({args.cap_gib:g} GiB cgroup limit, {args.cap_layers} layers)",
            "command": f"python bench/scale.py --only cap --cap-layers {args.cap_layers} --cap-gib {args.cap_gib:g}",
            "model": f"synthetic Qwen3-30B-A3B, {args.cap_layers} layers, {args.cap_source_gib:.1f} GiB of bf16 shards",
            "data": "as above; read back: the written checkpoint's perplexity on 1,024 dev tokens, layer by layer, under "
                    "the same cap; cgroup peak includes the page cache",
            "machine": machine, "date": time.strftime("%Y-%m-%d"),
            "columns": ["command", "exit", "seconds", "peak RSS GiB", "cgroup peak GiB", "output read back (exit)"],
            "formats": ["", "", ".0f", ".2f", ".2f", ""],
            "rows": [[r["command"], r["code"], r["seconds"], r.get("above_base_gib"), r.get("cgroup_peak_gib"),
                      r.get("readback_code", "—")] for r in cap]})
    timing = [r for r in recs if r["experiment"] == "time"]
    if timing:
        r = timing[-1]
        write_json(RESULTS / "tables" / "scale_time.json", {
            "title": "Layer-sequential profile against in-memory profile (target ratio <= 1.3)",
            "command": f"python bench/scale.py --only time --repeats {args.repeats}",
            "model": "smollm2-moe (embedded default), fp32",
            "data": f"{r['tokens']:,} calibration tokens (16 x 512) of calib/c4_train_head.jsonl; median of {args.repeats}, "
                    "alternating",
            "machine": "2-core development CPU, no GPU", "date": time.strftime("%Y-%m-%d"),
            "columns": ["in memory (load + profile) s", "layer-sequential s", "ratio", "largest relative difference of any statistic"],
            "formats": [".1f", ".1f", ".2f", ".1e"],
            "rows": [[r["memory_s"], r["sequential_s"], r["ratio"], r["max_relative_difference"]]]})


def main() -> None:
    ap = add_common(parser(__doc__), out=None)
    ap.add_argument("--only", nargs="+", default=["time", "depth", "fp8", "cap"], choices=["time", "depth", "fp8", "cap"])
    ap.add_argument("--layers", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--cap-layers", type=int, default=12)
    ap.add_argument("--cap-gib", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moekit-scale",
                    help="checkpoints (tens of GB; deleted as the run goes)")
    ap.add_argument("--log", default=str(RESULTS / "scale.jsonl"), help="JSON-lines log of every command run")
    ap.add_argument("--tables-only", action="store_true", help="rebuild the tables from the log")
    ap.add_argument("--commands", nargs="+", default=None, choices=["profile", "prune", "merge", "route", "densify", "ppl"],
                    help="run only these commands of each chain (the tables keep the last run of each)")
    args = parse(ap)
    args.log = Path(args.log)
    args.work.mkdir(parents=True, exist_ok=True)
    first = synthetic(args.work / f"qwen3-30b-a3b-{min(args.layers)}L", min(args.layers))
    args.layer_gib = layer_gib(first)
    args.cap_source_gib = args.cap_layers * args.layer_gib + 151936 * 2048 * 2 * 2 / 2**30
    if not args.tables_only:
        if "time" in args.only:
            time_profile(args)
        for n in sorted(args.layers):
            if "depth" in args.only:
                args.current_layers = n
                src = synthetic(args.work / f"qwen3-30b-a3b-{n}L", n)
                chain(args, src, args.work / "out", "depth", only=args.commands)
        if "fp8" in args.only:
            args.current_layers = min(args.layers)
            src = synthetic(args.work / f"qwen3-30b-a3b-{min(args.layers)}L-fp8", min(args.layers), fp8=True)
            chain(args, src, args.work / "out", "fp8", only=tuple(c for c in ("profile", "prune", "ppl")
                                                                 if not args.commands or c in args.commands))
            shutil.rmtree(src)
        for n in sorted(args.layers):
            shutil.rmtree(args.work / f"qwen3-30b-a3b-{n}L", ignore_errors=True)
        if "cap" in args.only:
            make_cgroup(args.cap_gib)
            args.current_layers = args.cap_layers
            src = synthetic(args.work / f"qwen3-30b-a3b-{args.cap_layers}L", args.cap_layers)
            chain(args, src, args.work / "out", "cap", only=args.commands, cap=True)
            shutil.rmtree(src)
    tables(args)


if __name__ == "__main__":
    main()
