"""REAP expert pruning with llm-compressor, run by the llm-compressor environment's own Python.

Executed as a script (``python peer_llmc_worker.py REQUEST.json RESPONSE.json``) by ``bench/peer_llmcompressor.py``
through ``moekit.serve.envs.run_worker``, never imported: llm-compressor pins its own transformers, so this script
needs nothing but llm-compressor (with its torch, transformers, safetensors) and the standard library.

REQUEST:  {"model": DIR, "tokens": FILE.safetensors (key "input_ids", [n_seq, seq_len]),
           "moe_calibrate_all_experts": bool,
           "runs": [{"name": str, "sparsity": 0.25, "propagate_error": true, "out": DIR}, ...]}
RESPONSE: {"llmcompressor": version, "compressed_tensors": version, "transformers": version, "torch": version,
           "runs": {name: {"load_seconds": s, "oneshot_seconds": s, "save_seconds": s,
                           "kept": {layer index: [source expert indices]}, "num_experts": n}}}
          or {"error": "one line"}

Each run loads the checkpoint afresh with plain ``AutoModelForCausalLM.from_pretrained`` (llm-compressor's own loading
path imports torchvision, which has no CPU build for this torch), hands the model object and a DataLoader over the
given token ids (no tokenizer, no shuffling, no padding) to ``oneshot`` with ``REAPPruningModifier(sparsity=...)``
and the run's ``propagate_error``, then packs the linearized experts back into the native fused module
(``repack_moe``) and writes a plain checkpoint for the caller to score. The kept experts come from the modifier's
own ``report_path`` file.
"""

import json
import sys
import time


def run_one(req: dict, run: dict, input_ids) -> dict:
    import os
    import tempfile

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import repack_moe
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - start

    samples = [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row)} for row in input_ids]
    loader = DataLoader(samples, batch_size=1, shuffle=False)  # default collate: [1, seq_len] per batch
    fd, report = tempfile.mkstemp(prefix="reap-kept-", suffix=".json")
    os.close(fd)
    try:
        recipe = REAPPruningModifier(sparsity=run["sparsity"], report_path=report)
        start = time.perf_counter()
        oneshot(model=model, recipe=recipe, dataset=loader, propagate_error=run["propagate_error"],
                moe_calibrate_all_experts=req.get("moe_calibrate_all_experts", True))
        oneshot_s = time.perf_counter() - start
        with open(report) as f:
            retained = json.load(f)  # {"model.layers.i.mlp": [kept source indices]}
    finally:
        os.unlink(report)

    kept = {}
    for name, experts in retained.items():
        parts = name.split(".")
        kept[int(parts[parts.index("layers") + 1])] = [int(e) for e in experts]

    start = time.perf_counter()
    repack_moe(model)  # LinearExperts2D -> the native fused experts module, so the checkpoint is a standard one
    model.save_pretrained(run["out"])
    save_s = time.perf_counter() - start
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"load_seconds": load_s, "oneshot_seconds": oneshot_s, "save_seconds": save_s,
            "kept": {str(k): v for k, v in sorted(kept.items())}, "num_experts": int(cfg.num_experts)}


def prune(req: dict) -> dict:
    import importlib.metadata as md

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(int(req.get("threads") or torch.get_num_threads()))
    input_ids = load_file(req["tokens"])["input_ids"].long()
    runs = {}
    for run in req["runs"]:
        runs[run["name"]] = run_one(req, run, input_ids)
        print(f"{run['name']}: oneshot {runs[run['name']]['oneshot_seconds']:.1f} s", flush=True)
    return {"llmcompressor": md.version("llmcompressor"), "compressed_tensors": md.version("compressed-tensors"),
            "transformers": md.version("transformers"), "torch": md.version("torch"), "runs": runs}


def main(request_path: str, response_path: str) -> int:
    with open(request_path) as f:
        req = json.load(f)
    try:
        response = prune(req)
    except Exception as e:  # reported by the caller as one line
        import traceback

        traceback.print_exc()
        response = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
    with open(response_path, "w") as f:
        json.dump(response, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
