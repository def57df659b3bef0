#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): Qwen3-30B-A3B's config, all 48 layers, random bf16 weights built on the GPU;
# profile, prune -25%, route 8 -> 4, perplexity; one table of times and peak GPU memory. Under 8 minutes on one
# large GPU. Needs torch, transformers, accelerate and safetensors; moekit comes from this source tree.
#   bash bench/gpu_check.sh [--data-dir DIR] [--tokenizer DIR] [--save] [--json FILE]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec python "$here/bench/gpu_check.py" "$@"
