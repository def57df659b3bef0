"""The GPU check: Qwen3-30B-A3B's exact config (all 48 decoder layers, random bf16 weights built on the GPU, nothing
downloaded), profiled, pruned by 25%, re-routed 8 -> 4 with the default mitigation, and scored on the dev text; each
step's time and peak GPU memory in one table. Run by bench/gpu_check.sh on a machine with one large GPU (an H200:
the model is 61 GB in bf16); needs only torch, transformers, accelerate, safetensors and moekit's source tree.

The dev text and the tokenizer come from --data-dir (dev/c4_valid_dev.jsonl, calib/c4_train_head.jsonl) and
--tokenizer (a folder with tokenizer.json; default: the embedded default's, whose ids all fall inside Qwen3's
vocabulary). With random weights the perplexities say nothing about quality; they show that every step ran and that
the model still computes finite numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48, help="decoder layers (48: the real model)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data-dir", default=os.environ.get("MOEKIT_DATA") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded default model's)")
    ap.add_argument("--calib", type=int, nargs=2, default=(32, 512), metavar=("N_SEQ", "SEQ_LEN"))
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--save", action="store_true", help="also save the final model (sharded, verified) to a "
                    "temporary folder and time it, when the disk has room")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from moekit.checkpoint.synthetic import QWEN3_30B_A3B
    from moekit.data import calibration_tokens
    from moekit.eval.perplexity import perplexity, windows
    from moekit.profile.profile import ProfileConfig, profile
    from moekit.prune.prune import PruneConfig, prune_
    from moekit.route.route import RouteConfig, route_

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rows: list[dict] = []

    def step(name: str, fn):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        row = {"step": name, "seconds": round(time.perf_counter() - t0, 1),
               "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
               "result": result if isinstance(result, (int, float, str)) or result is None else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return result

    data = Path(args.data_dir)
    tok_dir = args.tokenizer
    if tok_dir is None:
        from moekit.checkpoint.load import resolve

        tok_dir = resolve("smollm2-moe")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    calib = calibration_tokens(str(data / "calib" / "c4_train_head.jsonl"), tok, n_seq=args.calib[0],
                               seq_len=args.calib[1], seed=0)
    dev = windows(tok, str(data / "dev" / "c4_valid_dev.jsonl"), max_tokens=args.ppl_tokens, window=1024)

    config = AutoConfig.for_model(**{**QWEN3_30B_A3B, "num_hidden_layers": args.layers})

    def build():
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():  # initialised like a trained model's scale, so activations stay finite
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
        return model.eval()

    model = step(f"build {args.layers} layers on {device} (bf16)", build)
    stats = step(f"profile ({args.calib[0]} x {args.calib[1]} tokens)", lambda: profile(model, ProfileConfig(progress=False), tokens=calib))
    step("perplexity, original", lambda: round(perplexity(model, dev, batch_size=4, progress=False), 2))
    step("prune -25% (REAP, uniform)", lambda: prune_(model, PruneConfig(ratio=0.25), stats=stats) and None)
    step("perplexity, pruned", lambda: round(perplexity(model, dev, batch_size=4, progress=False), 2))
    step("route 8 -> 4 (rescale)", lambda: route_(model, RouteConfig(top_k=4, mitigations=("rescale",)), stats=stats,
                                                   tokens=calib[:8]) and None)
    step("perplexity, pruned + top-4", lambda: round(perplexity(model, dev, batch_size=4, progress=False), 2))
    if args.save:
        from moekit.checkpoint.save import save_model

        need = sum(p.numel() * p.element_size() for p in model.parameters())
        where = Path(tempfile.mkdtemp(prefix="moekit-gpu-check-"))
        if shutil.disk_usage(where).free > 1.1 * need:
            step("save (sharded, verified)", lambda: save_model(model, tok, where / "out") and None)
        else:
            print(f"save skipped: {shutil.disk_usage(where).free / 2**30:.0f} GiB free, {need / 2**30:.0f} GiB needed")
        shutil.rmtree(where, ignore_errors=True)

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"\nmoekit GPU check: Qwen3-30B-A3B config, {args.layers} layers, on {name}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("| step | seconds | peak GPU GiB | result |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']} | {r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else '—'} | "
              f"{'' if r['result'] is None else r['result']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__,
                                               "transformers": transformers.__version__, "layers": args.layers,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
