"""`moekit prune` and `moekit uniform`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moekit.cli import app
from moekit.cli.common import (DEVICE, DEVICE_MAP, DTYPE, MAX_MEMORY, MODE, MODEL, OFFLOAD, OVERWRITE, TRUST, load,
                               mode_for, option, tokenizer_of)
from moekit.prune.prune import CALIBRATION_FREE, DEFAULT_CRITERION, PruneConfig

STATS = typer.Option(..., "--stats", help="statistics file from `moekit profile` (made for MODEL)")
PRUNE_STATS = typer.Option(None, "--stats", help="statistics file from `moekit profile` (made for MODEL); "
                           f"optional for the calibration-free criteria ({', '.join(CALIBRATION_FREE)})")
OUT = typer.Option(..., "--out", help="output checkpoint directory (written atomically)")
CRITERION_HELP = (
    "topk_prime (the Samsung AI Challenge 2025 pipeline's top-k' count), frequency, prob_mass, weighted_frequency, reap, ean, "
    "man (= ean), msan, aimer (from the weights, no --stats needed), random; default reap, or topk_prime with "
    "--top-k-prime alone"
)


def _print_report(report: dict, out: Path) -> None:
    from moekit.prune.report import report_markdown, write_report

    paths = write_report(report, out)
    print(report_markdown(report))
    print(f"wrote {out} (report: {', '.join(p.name for p in paths)})")


@app.command()
def prune(
    model: str = MODEL,
    stats: Path = PRUNE_STATS,
    out: Path = OUT,
    criterion: str = option(PruneConfig, "criterion", "--criterion", help=CRITERION_HELP),
    keep: int = option(PruneConfig, "keep", "--keep",
                       help="experts kept per layer (uniform) or per layer on average (global)"),
    ratio: float = option(PruneConfig, "ratio", "--ratio", help="fraction of routed experts removed, e.g. 0.25"),
    top_k_prime: int = option(
        PruneConfig,
        "top_k_prime",
        "--top-k-prime",
        help="k' of the top-k' rule; alone: keep experts selected within the top-k' at least --tau times",
    ),
    tau: float = option(PruneConfig, "tau", "--tau",
                        help="threshold rule: minimum top-k' selections to keep an expert"),
    budget: str = option(PruneConfig, "budget", "--budget",
                         help="uniform (same count per layer) or global (one ranking)"),
    allow_super_experts: bool = option(PruneConfig, "allow_super_experts", "--allow-super-experts",
                                       help="let super experts be pruned too"),
    seed: int = option(PruneConfig, "seed", "--seed", help="seed of the random criterion"),
    global_norm: str = option(
        PruneConfig, "global_norm", "--global-norm", help="global budget: divide scores by the layer 'mean' or 'median'"
    ),
    shardwise: bool = typer.Option(
        False,
        "--shardwise",
        help="prune straight from the safetensors shards without loading the model (uniform results only)",
    ),
    overwrite: bool = OVERWRITE,
    dtype: str = DTYPE,
    device: str = DEVICE,
    device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
    trust_remote_code: bool = TRUST,
    mode: str = MODE,
    propagate: bool = option(PruneConfig, "propagate", "--propagate/--no-propagate",
                             help="error-propagating scores: layer i scored on the hidden states the already pruned "
                             "layers 0..i-1 compute (one walk over the layers per ratio; --stats then only names the "
                             "super experts). The default with --data for the criteria where it measured better (reap, "
                             "ean, frequency, weighted_frequency) and a uniform --keep or --ratio plan; others with "
                             "--propagate. --no-propagate, "
                             "or no --data: the one-pass fast path, every layer scored from --stats alone (one profile "
                             "serves every ratio)"),
    data: str = typer.Option(None, "--data", help="calibration text for the error-propagating scores (see --propagate)"),
    n_seq: int = typer.Option(16, "--n-seq", help="with --data: calibration sequences"),
    seq_len: int = typer.Option(512, "--seq-len", help="with --data: tokens per sequence"),
):
    """Remove whole routed experts chosen from the statistics file (or, for aimer, the weights); write the checkpoint
    and a report."""
    from moekit.checkpoint.save import save_model
    from moekit.errors import MoekitError
    from moekit.outputs import check_output_dir
    from moekit.prune.prune import PruneConfig, prune_, require_stats
    from moekit.profile.stats import ExpertStats

    cfg = PruneConfig(
        criterion=criterion,
        keep=keep,
        ratio=ratio,
        top_k_prime=top_k_prime,
        tau=tau,
        budget=budget,
        allow_super_experts=allow_super_experts,
        seed=seed,
        global_norm=global_norm,
        propagate=propagate,
    )
    cfg.validate()
    require_stats(cfg, stats is not None)
    check_output_dir(out, overwrite)
    st = ExpertStats.load(stats) if stats is not None else None
    if st is None and not allow_super_experts:
        print("moekit: no --stats: super experts cannot be found, so none is protected", file=sys.stderr)
    propagating = cfg.propagates(data is not None)
    if data is not None and not propagating:
        why = ("--no-propagate" if propagate is False else cfg.cannot_propagate() or
               f"criterion '{cfg.criterion}' is scored in one pass by default (--propagate to score it error-propagating)")
        print(f"moekit: --data is not used: {why}", file=sys.stderr)
    if propagating:
        from moekit.data import calibration_tokens

        if shardwise:
            raise MoekitError("--shardwise scores every layer from --stats alone: drop --data, or add --no-propagate")
        if mode_for(model, mode, device, dtype, "prune", device_map, max_memory, offload_folder) == "sequential":
            from moekit.prune.sequential import prune_propagating

            tokens = calibration_tokens(data, tokenizer_of(model, trust_remote_code), n_seq=n_seq, seq_len=seq_len,
                                        seed=seed)
            report = prune_propagating(model, cfg, out, stats=st, tokens=tokens, overwrite=overwrite, device=device,
                                       dtype=dtype)
        else:
            m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
            tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, seed=seed, model=m)
            report = prune_(m, cfg, stats=st, tokens=tokens)
            save_model(m, tok, out, overwrite=overwrite)
    elif shardwise:
        from moekit.checkpoint.load import local_checkpoint
        from moekit.prune.shards import prune_shards

        report = prune_shards(local_checkpoint(model, purpose="--shardwise"), st, cfg, out, overwrite=overwrite)
    elif mode_for(model, mode, device, dtype, "prune", device_map, max_memory, offload_folder) == "sequential":
        from moekit.prune.sequential import prune_sequential

        report = prune_sequential(model, cfg, out, stats=st, overwrite=overwrite, device=device, dtype=dtype)
    else:
        m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
        report = prune_(m, cfg, stats=st)
        save_model(m, tok, out, overwrite=overwrite)
    _print_report(report, out)


@app.command()
def uniform(
    model: str = MODEL,
    stats: Path = STATS,
    out: Path = OUT,
    keep: int = typer.Option(None, "--keep", help="experts per layer (default: the smallest layer's count)"),
    criterion: str = typer.Option(DEFAULT_CRITERION, "--criterion", help="which experts go first in the larger layers"),
    allow_super_experts: bool = typer.Option(False, "--allow-super-experts", help="let super experts be pruned too"),
    overwrite: bool = OVERWRITE,
    dtype: str = DTYPE,
    device: str = DEVICE,
    device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
    trust_remote_code: bool = TRUST,
):
    """Turn a model with different expert counts per layer into a standard (uniform) checkpoint."""
    from moekit.checkpoint.save import save_model
    from moekit.outputs import check_output_dir
    from moekit.prune.prune import make_uniform
    from moekit.profile.stats import ExpertStats

    check_output_dir(out, overwrite)
    st = ExpertStats.load(stats)
    m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
    report = make_uniform(m, st, keep=keep, criterion=criterion, allow_super_experts=allow_super_experts)
    save_model(m, tok, out, overwrite=overwrite)
    _print_report(report, out)
