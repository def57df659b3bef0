"""Profiler benchmarks, ratios measured side by side in one run.

    PYTHONPATH=$PWD python bench/profile_bench.py --model smollm2-moe --out bench/results/

1. time of moekit's profile / a plain forward of the same decoder stack over the same tokens (target <= 1.15);
2. time of a REAP-style all-experts observer (every expert on every token) / moekit's profile;
3. peak memory above the post-import RSS: --stream / in-memory (each in its own process; target <= 0.35);
4. super experts on the model (paper and first-75% rules), their statistic, and the perplexity jump when they are
   ablated vs random ablations of the same count; the same on a tiny model with a planted super expert.

``--model random-qwen2-moe`` builds a randomly initialised mid-size Qwen2-MoE in a temporary directory (for use
before the embedded default exists).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from common import ROOT, add_common, load, parse, parser, profile_tokens, write_json

sys.path.insert(0, str(ROOT / "tests"))  # tests/tiny.py and the planted super-expert model


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0).

    ru_maxrss is no use here: it keeps the parent's peak across fork + exec."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    return _status_mb("VmHWM")


# ------------------------------------------------------------------------------------------------ models
def random_qwen2_moe(path: Path, tokenizer_from: str | None) -> Path:
    """A randomly initialised Qwen2-MoE of about 180M parameters, saved with a real tokenizer if one is at hand."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2_moe", vocab_size=49152, hidden_size=576, num_hidden_layers=12, num_attention_heads=9,
                               num_key_value_heads=3, intermediate_size=1536, moe_intermediate_size=384,
                               shared_expert_intermediate_size=768, num_experts=16, num_experts_per_tok=2,
                               max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    if tokenizer_from:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return path


def resolve_model(name: str, tmp: Path) -> str:
    if name != "random-qwen2-moe":
        return name
    tok_dir = None
    try:
        from moekit.checkpoint.smollm2 import smollm2_path

        tok_dir = str(smollm2_path())
    except Exception as e:  # noqa: BLE001 (a tokenizer is optional here)
        print(f"(no SmolLM2 tokenizer: {e}; using random token ids)")
    return str(random_qwen2_moe(tmp / "random-qwen2-moe", tok_dir))


def calibration(name: str, calib: str, n_seq: int, seq_len: int, vocab: int) -> torch.Tensor:
    """``n_seq`` x ``seq_len`` tokens of ``calib`` with the model's tokenizer; random ids without one or the file."""
    from transformers import AutoTokenizer

    from moekit.data import calibration_tokens
    from moekit.checkpoint.load import local_checkpoint

    try:
        tok = AutoTokenizer.from_pretrained(local_checkpoint(name, purpose="--stream"))
    except (OSError, ValueError, TypeError):
        tok = None
    if tok is None or not Path(calib).exists():
        return torch.randint(3, vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    return calibration_tokens(calib, tok, n_seq=n_seq, seq_len=seq_len)


# ------------------------------------------------------------------------------------------------ REAP-style observer
class AllExpertsObserver:
    """What REAP's default observer does: every expert on every token, statistics kept for the routed ones."""

    def __init__(self, layer):
        self.layer = layer
        e = layer.num_experts
        self.reap_sum = torch.zeros(e, dtype=torch.float64)
        self.count = torch.zeros(e, dtype=torch.float64)

    def forward(self, x, indices, weights):
        layer, e = self.layer, self.layer.num_experts
        outs = torch.stack([layer.expert_forward(i, x) for i in range(e)])  # [E, T, H]: all experts, all tokens
        norms = outs.float().norm(dim=-1)  # [E, T]
        dense_w = torch.zeros(x.shape[0], e + 1, dtype=weights.dtype).scatter_(1, indices, weights)[:, :e]  # [T, E]
        routed = dense_w > 0
        self.reap_sum += (norms.T * dense_w.float() * routed).sum(0).double()
        self.count += routed.sum(0).double()
        return torch.einsum("te,eth->th", dense_w.to(outs.dtype), outs)


@contextmanager
def all_experts_observer(model):
    from moekit.core.arch import moe_layers

    obs = [AllExpertsObserver(layer) for layer in moe_layers(model)]
    for o in obs:
        o.layer.experts.forward = o.forward
    try:
        yield obs
    finally:
        for o in obs:
            del o.layer.experts.forward


# ------------------------------------------------------------------------------------------------ timing
@torch.no_grad()
def plain_forward(body, tokens, batch_size):
    for i in range(0, tokens.shape[0], batch_size):
        body(input_ids=tokens[i : i + batch_size], use_cache=False)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_ratios(model, tokens, batch_size: int, repeats: int) -> dict:
    from moekit.profile.profile import ProfileConfig

    body = model.model
    cfg = ProfileConfig(batch_size=batch_size, progress=False)
    plain_forward(body, tokens[:batch_size], batch_size)  # warm-up
    t = {"forward": [], "profile": [], "reap_observer": [], "full_forward_with_logits": [], "forward_eager_experts": []}
    default_impl = model.config._experts_implementation
    for _ in range(repeats):  # interleaved, so machine load hits all alike
        t["forward"].append(timed(lambda: plain_forward(body, tokens, batch_size)))
        t["profile"].append(timed(lambda: profile_tokens(model, tokens, cfg)))
        t["full_forward_with_logits"].append(timed(lambda: plain_forward(model, tokens, batch_size)))
        model.config._experts_implementation = "eager"  # transformers' per-expert loop, for comparison
        t["forward_eager_experts"].append(timed(lambda: plain_forward(body, tokens, batch_size)))
        model.config._experts_implementation = default_impl
    with all_experts_observer(model):
        t["reap_observer"].append(timed(lambda: plain_forward(body, tokens, batch_size)))
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "seconds": t,
        "median_seconds": med,
        "profile_over_forward": med["profile"] / med["forward"],
        "profile_over_full_forward": med["profile"] / med["full_forward_with_logits"],
        "profile_over_forward_eager_experts": med["profile"] / med["forward_eager_experts"],
        "experts_implementation": default_impl,
        "reap_observer_over_profile": med["reap_observer"] / med["profile"],
        "tokens": int(tokens.numel()),
    }


# ------------------------------------------------------------------------------------------------ memory (child)
def memory_child(mode: str, name: str, calib: str, n_seq: int, seq_len: int, batch_size: int) -> dict:
    from transformers import AutoConfig

    import moekit.profile.profile
    import moekit.profile.stream  # noqa: F401 (imported before the memory baseline on purpose)
    from moekit.checkpoint.load import local_checkpoint

    config = AutoConfig.from_pretrained(local_checkpoint(name, purpose="--stream"))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # import the model's code before the baseline too
    tokens = calibration(name, calib, n_seq, seq_len, config.vocab_size)
    reset_peak()
    base = rss_mb()
    from moekit.profile.profile import ProfileConfig

    cfg = ProfileConfig(batch_size=batch_size, progress=False)
    t0 = time.perf_counter()
    if mode == "stream":
        from moekit.profile.stream import profile_stream

        profile_stream(name, tokens, cfg, device="cpu", dtype="float32")
    else:
        model, _ = load(name, with_tokenizer=False)
        profile_tokens(model, tokens, cfg)
    return {"mode": mode, "baseline_rss_mb": base, "peak_rss_mb": peak_mb(), "peak_above_baseline_mb": peak_mb() - base,
            "seconds": time.perf_counter() - t0}


def memory_ratio(name: str, calib: str, n_seq: int, seq_len: int, batch_size: int) -> dict:
    out = {}
    for mode in ("inmem", "stream"):
        cmd = [sys.executable, __file__, "--child", mode, "--threads", str(torch.get_num_threads()), "--model", name, "--calib", calib, "--n-seq", str(n_seq), "--seq-len", str(seq_len),
               "--batch-size", str(batch_size)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    out["stream_over_inmem"] = out["stream"]["peak_above_baseline_mb"] / out["inmem"]["peak_above_baseline_mb"]
    return out


# ------------------------------------------------------------------------------------------------ super experts
def super_expert_report(model, stats, ppl_tokens, batch_size: int, n_random: int) -> dict:
    from moekit.profile.ablate import ablate, measure, random_experts
    from moekit.profile.stats import massive_layers, super_expert_threshold, super_experts, super_shared_experts

    found = {rule: super_experts(stats, rule=rule) for rule in ("paper", "first75")}
    flat = sorted(((stats.get("down_max", li)[e].item(), li, e) for li in stats.layers
                   for e in range(stats.get("down_max", li).numel())), reverse=True)
    report = {
        "hidden_max": [round(v, 3) for v in stats.get("hidden_max").tolist()],
        "massive_layers": massive_layers(stats),
        "threshold": super_expert_threshold(stats),
        "found": {k: [list(p) for p in v] for k, v in found.items()},
        "top5_down_max": [[li, e, round(a, 3)] for a, li, e in flat[:5]],
        "shared_above_threshold": {li: round(stats.get("shared_down_max", li).max().item(), 3)
                                   for li in super_shared_experts(stats)} if stats.has("shared_down_max") else {},
        "experts_total": sum(stats.get("down_max", li).numel() for li in stats.layers),
    }
    chosen = found["paper"] or found["first75"]
    label = "paper" if found["paper"] else "first75"
    if not chosen:  # nothing passes either rule: still measure the expert with the largest statistic
        chosen, label = [(flat[0][1], flat[0][2])], "top statistic (not a super expert)"
    base = measure(model, ppl_tokens, batch_size=batch_size, progress=False)
    se = ablate(model, ppl_tokens, chosen, batch_size=batch_size, baseline=base, progress=False)
    rnd = [ablate(model, ppl_tokens, random_experts(model, len(chosen), seed=s, exclude=chosen), batch_size=batch_size,
                  baseline=base, progress=False) for s in range(n_random)]
    report["ablation"] = {
        "experts": [list(p) for p in chosen], "which": label, "ppl_intact": base[0], "ppl_ablated": se.ppl_after,
        "d_sink": [round(v, 4) for v in se.d_sink],
        "random": [{"experts": [list(p) for p in r.experts], "ppl": r.ppl_after,
                    "d_sink_mean": sum(r.d_sink) / len(r.d_sink)} for r in rnd],
        "ppl_tokens": int(ppl_tokens.numel()),
    }
    return report


def planted_report(batch_size: int) -> dict:
    from test_super_experts import PLANTED, planted_model
    from tiny import ids

    from moekit.profile.profile import ProfileConfig

    model = planted_model()
    stats = profile_tokens(model, ids(batch=8, length=32), ProfileConfig(progress=False))
    out = super_expert_report(model, stats, ids(batch=8, length=32, seed=1), batch_size, n_random=5)
    out["planted"] = list(PLANTED)
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = add_common(parser(__doc__))
    ap.add_argument("--n-seq", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--random", type=int, default=3, help="random-ablation controls")
    ap.add_argument("--skip", nargs="*", default=[], choices=["time", "memory", "super", "planted"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the dev machine's 2 cores are shared)")
    ap.add_argument("--child", choices=["inmem", "stream"], help=argparse.SUPPRESS)
    args = parse(ap)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(args.child, args.model, args.calib, args.n_seq, args.seq_len, args.batch_size)))
        return

    from moekit.eval.perplexity import windows
    from moekit.profile.profile import ProfileConfig

    results: dict = {"machine": f"CPU, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} cores, load average "
                                f"{os.getloadavg()[0]:.1f} at start, torch {torch.__version__}"}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        name = resolve_model(args.model, tmp)
        model, tok = load(name, with_tokenizer=False)
        tokens = calibration(name, args.calib, args.n_seq, args.seq_len, model.config.vocab_size)
        results.update(model=args.model, calib_tokens=int(tokens.numel()),
                       data=args.calib if Path(args.calib).exists() else "random ids")
        if "time" not in args.skip:
            results["time"] = time_ratios(model, tokens, args.batch_size, args.repeats)
            print(json.dumps(results["time"]["median_seconds"]), flush=True)
        if "memory" not in args.skip:
            results["memory"] = memory_ratio(name, args.calib, args.n_seq, args.seq_len, args.batch_size)
        if "super" not in args.skip:
            stats = profile_tokens(model, tokens, ProfileConfig(batch_size=args.batch_size, progress=False))
            from transformers import AutoTokenizer

            from moekit.checkpoint.load import local_checkpoint

            try:
                tok = AutoTokenizer.from_pretrained(local_checkpoint(name, purpose="--stream"))
                ppl_tokens = windows(tok, args.dev, max_tokens=args.ppl_tokens, window=512)
            except (OSError, ValueError, TypeError):
                ppl_tokens = torch.randint(3, model.config.vocab_size, (args.ppl_tokens // 512, 512))
            results["super_experts"] = super_expert_report(model, stats, ppl_tokens, args.batch_size, args.random)
    if "planted" not in args.skip:
        results["planted"] = planted_report(args.batch_size)

    tag = args.model.replace("/", "_")
    write_json(Path(args.out) / f"profile_{tag}.json", results, indent=1)
    print_table(results)


def print_table(r: dict) -> None:
    print(f"\nmodel {r['model']}  ({r['machine']}; {r['calib_tokens']:,} calibration tokens of {r['data']})")
    if "time" in r:
        t = r["time"]
        m = t["median_seconds"]
        print(f"  profile / plain forward (decoder stack)   {t['profile_over_forward']:.3f}   "
              f"({m['profile']:.2f}s / {m['forward']:.2f}s, median of {len(t['seconds']['profile'])})")
        print(f"  (plain forward uses transformers' '{t['experts_implementation']}' experts; with its 'eager' per-expert "
              f"loop: {t['profile_over_forward_eager_experts']:.3f})")
        print(f"  profile / full forward (with logits)      {t['profile_over_full_forward']:.3f}")
        print(f"  REAP all-experts observer / profile       {t['reap_observer_over_profile']:.2f}   ({m['reap_observer']:.2f}s)")
    if "memory" in r:
        mm = r["memory"]
        print(f"  stream / in-memory peak above imports     {mm['stream_over_inmem']:.3f}   "
              f"({mm['stream']['peak_above_baseline_mb']:.0f} MB / {mm['inmem']['peak_above_baseline_mb']:.0f} MB)")
    for key in ("super_experts", "planted"):
        if key in r:
            s = r[key]
            a = s["ablation"]
            rnd = ", ".join(f"{x['ppl']:.3f}" for x in a["random"])
            print(f"  [{key}] massive layers {s['massive_layers']}, found {s['found']}, threshold {s['threshold']:.3g}, "
                  f"top down_max {s['top5_down_max'][:3]}, shared experts above it {s['shared_above_threshold']}")
            print(f"  [{key}] ablate {a['experts']} ({a['which']}): ppl {a['ppl_intact']:.3f} -> {a['ppl_ablated']:.3f}; "
                  f"random same count -> [{rnd}]")


if __name__ == "__main__":
    main()
