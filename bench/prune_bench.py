"""Shard-wise pruning time against a plain copy of the same checkpoint (target: ratio <= 1.5).

    python bench/prune_bench.py [--model DIR] [--ratio 0.5] [--repeats 3] [--out bench/results]

Without --model it writes a synthetic Qwen3-MoE checkpoint (random weights, bf16, several shards) into a
temporary directory. Both measurements run on a warm page cache, alternated, each after os.sync(), median of
--repeats (writeback of earlier runs otherwise lands in whichever measurement comes next).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, parse, parser, write_json


def synthetic_checkpoint(path: Path, layers: int, experts: int, hidden: int, expert_size: int, shard: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        moe_intermediate_size=expert_size,
        num_experts=experts,
        num_experts_per_tok=4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size=shard)


def random_stats(src: Path):
    from moekit.core import arch
    from moekit.profile.stats import ExpertStats, fingerprint
    from moekit.prune.shards import load_meta

    model, _, _ = load_meta(src)
    layers = arch.moe_layers(model)
    g = torch.Generator().manual_seed(0)
    st = ExpertStats(meta={"fingerprint": fingerprint(model), "layers": [x.index for x in layers]})
    for layer in layers:
        st.set("rank_counts", torch.randint(0, 100, (layer.num_experts, layer.top_k), generator=g).float(), layer.index)
    return st


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: a synthetic Qwen3-MoE)")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of experts removed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--expert-size", type=int, default=384)
    ap.add_argument("--shard", default="100MB")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parse(ap)

    from moekit.prune.prune import PruneConfig
    from moekit.prune.shards import prune_shards

    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    try:
        src = args.model
        if src is None:
            src = work / "src"
            synthetic_checkpoint(src, args.layers, args.experts, args.hidden, args.expert_size, args.shard)
        stats = random_stats(src)
        cfg = PruneConfig(criterion="frequency", ratio=args.ratio, allow_super_experts=True)
        shutil.copytree(src, work / "warm")  # warm the page cache
        shutil.rmtree(work / "warm")
        copy_t, prune_t = [], []
        for i in range(args.repeats):
            os.sync()  # start each measurement with no dirty pages left from the previous one
            t = time.perf_counter()
            shutil.copytree(src, work / f"copy{i}")
            copy_t.append(time.perf_counter() - t)
            os.sync()
            t = time.perf_counter()
            prune_shards(src, stats, cfg, work / f"pruned{i}")
            prune_t.append(time.perf_counter() - t)
            out_size = dir_size(work / f"pruned{i}")
            shutil.rmtree(work / f"copy{i}")
            shutil.rmtree(work / f"pruned{i}")
        c, p = statistics.median(copy_t), statistics.median(prune_t)
        row = {
            "checkpoint": str(args.model or "synthetic qwen3_moe bf16"),
            "size_bytes": dir_size(src),
            "shards": len(list(src.glob("*.safetensors"))),
            "pruned_bytes": out_size,
            "ratio_removed": args.ratio,
            "copy_s": round(c, 3),
            "shardwise_s": round(p, 3),
            "time_ratio": round(p / c, 3),
            "copy_all_s": [round(x, 3) for x in copy_t],
            "shardwise_all_s": [round(x, 3) for x in prune_t],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| checkpoint | size | shards | plain copy (s) | shard-wise prune {args.ratio:.0%} (s) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    print(
        f"| {row['checkpoint']} | {row['size_bytes'] / 2**20:.0f} MiB | {row['shards']} | {c:.2f} | {p:.2f} | "
        f"{p / c:.2f} (target <= 1.5) |"
    )
    write_json(args.out / "prune_bench.json", row, indent=1)


if __name__ == "__main__":
    main()
