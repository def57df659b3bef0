"""`moekit merge`: fewer experts per layer, each merged from a cluster of similar ones."""

from __future__ import annotations


from pathlib import Path

import typer

from moekit.cli import app
from moekit.outputs import write_json
from moekit.cli.common import (DEVICE, DEVICE_MAP, DTYPE, FIELD, MAX_MEMORY, MODE, MODEL, OFFLOAD, OVERWRITE, TRUST,
                               load, mode_for, option, propagating_mode, tokenizer_of)
from moekit.merge.merge import MergeConfig


@app.command()
def merge(model: str = MODEL,
          stats: str = typer.Option(..., "--stats", help="statistics file from `moekit profile` of this model"),
          out: str = typer.Option(..., "--out", help="output checkpoint directory"),
          data: str = typer.Option(None, "--data", help="calibration text (file, 'c4', 'hf:NAME', 'self'); needed "
                                   "for --learn and for fitted/auto router rows"),
          grouping: str = option(MergeConfig, "grouping",
                                 help="ream (REAP-saliency centres; measured best), hc (hierarchical clustering) "
                                 "or mcsmoe"),
          rule: str = option(MergeConfig, "rule",
                             help="select (keep the most important neurons; measured best), avg (frequency-weighted "
                             "average) or svd"),
          align: bool = option(MergeConfig, "align", "--align",
                               help="permute neurons onto the dominant member before merging"),
          rank: int = option(MergeConfig, "rank", help="svd rule: singular values kept per projection"),
          target: int = option(MergeConfig, "target", "--target", help="experts per layer after merging"),
          target_total: int = option(MergeConfig, "target_total", "--target-total",
                                     help="routed experts over all layers after merging"),
          merges_per_layer: int = option(MergeConfig, "merges_per_layer", "--merges-per-layer",
                                         help="experts removed per layer"),
          max_cluster: int = option(MergeConfig, "max_cluster", "--max-cluster", help="largest cluster"),
          router: str = option(MergeConfig, "router",
                               help="merged router row: dominant, average, fitted or auto (measured)"),
          learn: bool = option(MergeConfig, "learn", "--learn",
                               help="fit merge coefficients to reproduce each block's output"),
          learn_router: bool = option(MergeConfig, "learn_router", "--learn-router",
                                      help="with --learn, also fit merged router rows"),
          steps: int = option(MergeConfig, "steps", help="--learn: optimisation steps per layer"),
          lr: float = option(MergeConfig, "lr", help="--learn: step size"),
          super_rule: str = option(MergeConfig, "super_rule",
                                   help="super experts never merged: paper, first75 or none"),
          n_seq: int = typer.Option(32, help="calibration sequences"),
          seq_len: int = typer.Option(256, help="calibration sequence length"),
          seed: int = option(MergeConfig, "seed", help="calibration sampling and held-back split"),
          field: str = FIELD, dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
          device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
          overwrite: bool = OVERWRITE, mode: str = MODE,
          propagate: bool = typer.Option(False, "--propagate",
                                         help="error-propagating: fit layer i's router rows and coefficients on the "
                                         "hidden states the already merged layers 0..i-1 produce (needs --data; layer "
                                         "by layer). Without it every layer is fitted on the original model's states")):
    """Merge experts (one expert and one router row per cluster) and save the smaller model."""
    from moekit.data import calibration_tokens
    from moekit.checkpoint.save import save_model
    from moekit.outputs import check_output_dir
    from moekit.merge.merge import MergeConfig, merge_
    from moekit.profile.stats import ExpertStats

    cfg = MergeConfig(grouping=grouping, rule=rule, align=align, rank=rank, target=target, target_total=target_total,
                      merges_per_layer=merges_per_layer, max_cluster=max_cluster, router=router, learn=learn,
                      learn_router=learn_router, steps=steps, lr=lr, super_rule=super_rule, seed=seed)
    cfg.validate()
    out_path = check_output_dir(out, overwrite)
    st = ExpertStats.load(stats)
    tokens = None
    placement = (device_map, max_memory, offload_folder)
    mode = propagating_mode(propagate, mode, data, placement, "merge")
    if mode_for(model, mode, device, dtype, "merge", *placement) == "sequential":
        from moekit.merge.sequential import merge_sequential

        tok = tokenizer_of(model, trust_remote_code)
        if data is not None:
            tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, seed=seed)
        report = merge_sequential(model, cfg, out_path, stats=st, tokens=tokens, overwrite=overwrite, device=device,
                                  dtype=dtype, propagate=propagate)
    else:
        m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
        if data is not None:
            tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, seed=seed, model=m)
        report = merge_(m, cfg, stats=st, tokens=tokens)
        save_model(m, tok, out_path, overwrite=overwrite)
    write_json(out_path / "merge_report.json", report, indent=1, default=str, overwrite=True)  # beside the model it just wrote
    before, after = report["params_before"]["total"], report["params_after"]["total"]
    errs = [rec for rec in report["layers"] if "error_init" in rec]
    print(f"merged: {sum(r['experts_before'] for r in report['layers'])} -> "
          f"{sum(r['experts_after'] for r in report['layers'])} experts, parameters {before:,} -> {after:,}")
    if errs:
        learned = [r.get("error_learned", r["error_init"]) for r in errs]
        print(f"block reconstruction error (held-back, mean over layers): init "
              f"{sum(r['error_init'] for r in errs) / len(errs):.4f}, final {sum(learned) / len(learned):.4f}")
    print(f"saved to {out_path} (report: merge_report.json)")
