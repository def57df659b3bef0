"""`moekit densify` (MoE -> standard dense model), `moekit distill` (refine a student from a teacher) and
`moekit distill-router` (train only a pruned / merged / re-routed model's routers from the original)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from moekit.cli import app
from moekit.outputs import write_json
from moekit.cli.common import (DATA, DEVICE, DEVICE_MAP, DTYPE, FIELD, MAX_MEMORY, MODE, MODEL, OFFLOAD, OVERWRITE,
                               TRUST, load, mode_for, option, propagating_mode, tokenizer_of)
from moekit.densify.densify import DensifyConfig
from moekit.train.distill import DistillConfig
from moekit.train.router import RouterDistillConfig


@app.command()
def densify(model: str = MODEL,
            stats: Path = typer.Option(..., "--stats", help="statistics file from `moekit profile` (with --gram for do-acp)"),
            keep: int = option(DensifyConfig, "keep", "--keep", help="experts per layer concatenated into the dense FFN"),
            score: str = option(DensifyConfig, "score", "--score", help="sf, cp, acp, do-acp, reap, ean or random"),
            grouping: str = option(DensifyConfig, "grouping", "--grouping",
                                   help="select (drop the rest) or merge (fold them in)"),
            down_scaling: str = option(DensifyConfig, "down_scaling", "--down-scaling",
                                       help="uniform (1/K) or score (proportional)"),
            shared_gate: str = option(DensifyConfig, "shared_gate", "--shared-gate",
                                            help="Qwen2-MoE shared-expert gate: auto, mean (needs --data) or one"),
            data: str = typer.Option(None, "--data", help="calibration text: to fold a learned shared-expert gate, "
                                     "and for --propagate"),
            field: str = FIELD, seed: int = option(DensifyConfig, "seed", "--seed", help="seed of the random score"),
            n_seq: int = typer.Option(16, "--n-seq", help="--data: calibration sequences"),
            seq_len: int = typer.Option(512, "--seq-len", help="--data: tokens per sequence"),
            out: Path = typer.Option(..., "--out", help="output directory for the dense checkpoint"),
            overwrite: bool = OVERWRITE, dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
            device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
            mode: str = MODE,
            propagate: bool = typer.Option(False, "--propagate",
                                           help="error-propagating: score layer i's experts on the hidden states the "
                                           "already densified layers 0..i-1 produce (needs --data; layer by layer, "
                                           "each layer profiled afresh). Without it every layer is scored from --stats")):
    """Score experts from the profile, keep K per layer and concatenate them into one standard dense model."""
    from moekit.core.arch import param_counts
    from moekit.data import calibration_tokens
    from moekit.densify.densify import DensifyConfig
    from moekit.densify.densify import densify as run_densify
    from moekit.checkpoint.save import save_model
    from moekit.outputs import check_output_dir
    from moekit.profile.stats import ExpertStats

    cfg = DensifyConfig(keep=keep, score=score, grouping=grouping, down_scaling=down_scaling, seed=seed,
                        shared_gate=shared_gate)
    cfg.validate()
    check_output_dir(out, overwrite)
    st = ExpertStats.load(stats)
    t0 = time.perf_counter()
    placement = (device_map, max_memory, offload_folder)
    mode = propagating_mode(propagate, mode, data, placement, "densify")
    if mode_for(model, mode, device, dtype, "densify", *placement) == "sequential":
        from moekit.densify.sequential import densify_sequential

        tok = tokenizer_of(model, trust_remote_code)
        tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, seed=seed) if data else None
        done = densify_sequential(model, cfg, out, stats=st, tokens=tokens, overwrite=overwrite, device=device,
                                  dtype=dtype, propagate=propagate)
        how = "error-propagating" if propagate else "layer by layer"
        print(f"densified {model} into {done['to']} with {keep} experts per layer (FFN width {done['width']}) by "
              f"{score}/{grouping}, {how}, in {time.perf_counter() - t0:.1f}s -> {out}")
        return
    m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
    tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, seed=seed) if data else None
    dense = run_densify(m, cfg, stats=st, tokens=tokens)
    save_model(dense, tok, out, overwrite=overwrite)
    before, after = param_counts(m)["total"], param_counts(dense)["total"]
    print(f"densified {model} ({before:,} parameters) into {dense.config.model_type} with {keep} experts per layer "
          f"({after:,} parameters, FFN width {dense.config.intermediate_size}) by {score}/{grouping} "
          f"in {time.perf_counter() - t0:.1f}s -> {out}")


@app.command()
def distill(student: str = MODEL,
            teacher: str = typer.Option(..., "--teacher", help="teacher model (e.g. the MoE the student came from)"),
            data: str = DATA, field: str = option(DistillConfig, "field", "--field",
                                                  help="record field holding the text"),
            out: Path = typer.Option(..., "--out", help="directory for checkpoints and the final model (OUT/final)"),
            steps: int = option(DistillConfig, "steps", "--steps", help="optimizer steps"),
            lr: float = option(DistillConfig, "lr", "--lr", help="peak learning rate (warm-up, then cosine to 10%)"),
            batch_size: int = option(DistillConfig, "batch_size", "--batch-size", help="sequences per step"),
            seq_len: int = option(DistillConfig, "seq_len", "--seq-len", help="tokens per sequence"),
            warmup: int = option(DistillConfig, "warmup_steps", "--warmup", help="warm-up steps"),
            checkpoint_every: int = option(DistillConfig, "checkpoint_every", "--checkpoint-every",
                                           help="checkpoint every N steps (0: end only)"),
            resume: bool = option(DistillConfig, "resume", "--resume",
                                  help="continue from the newest checkpoint in --out"),
            seed: int = option(DistillConfig, "seed", "--seed", help="data order seed"),
            overwrite: bool = OVERWRITE, dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
            device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD):
    """Forward-KL distillation (T = 1) of the whole student from the teacher, with checkpoints and resume."""
    from moekit.train.distill import DistillConfig
    from moekit.train.distill import distill_
    from moekit.errors import MoekitError
    from moekit.checkpoint.save import save_model

    out = Path(out)
    final = out / "final"
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise MoekitError(f"output '{out}' is not empty: pass --resume to continue it or --overwrite to start over")
    cfg = DistillConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, warmup_steps=warmup, seed=seed,
                        field=field, out=str(out), checkpoint_every=checkpoint_every, resume=resume)
    cfg.validate()
    s_model, tok = load(student, "float32", device, trust_remote_code, device_map, max_memory, offload_folder)
    t_model, _ = load(teacher, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
    report = distill_(s_model, cfg, tokens=data, teacher=t_model, tokenizer=tok)
    save_model(s_model, tok, final, overwrite=True)
    losses = report.pop("losses")
    report.update(loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)
    write_json(out / "distill_report.json", report, overwrite=True)  # beside the model it just wrote
    print(f"distilled {report['steps_run']} steps ({report['tokens_run']:,} tokens) in {report['seconds']:.0f}s "
          f"({report['tokens_per_s']:.0f} tokens/s); loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}; "
          f"model -> {final}")


@app.command("distill-router")
def distill_router(student: str = MODEL,
                   teacher: str = typer.Option(..., "--teacher", help="the original model, before pruning / merging / routing"),
                   data: str = DATA, field: str = option(RouterDistillConfig, "field", "--field",
                                                         help="record field holding the text"),
                   out: Path = typer.Option(..., "--out", help="directory for checkpoints and the final model (OUT/final)"),
                   steps: int = option(RouterDistillConfig, "steps", "--steps", help="optimizer steps (unless --tokens)"),
                   max_tokens: int = option(RouterDistillConfig, "max_tokens", "--tokens",
                                            help="training-token budget: steps = tokens / (batch size x seq len)"),
                   lr: float = option(RouterDistillConfig, "lr", "--lr", help="peak learning rate (warm-up, then cosine to 10%)"),
                   batch_size: int = option(RouterDistillConfig, "batch_size", "--batch-size", help="sequences per step"),
                   seq_len: int = option(RouterDistillConfig, "seq_len", "--seq-len", help="tokens per sequence"),
                   warmup: int = option(RouterDistillConfig, "warmup_steps", "--warmup", help="warm-up steps"),
                   heldout: int = option(RouterDistillConfig, "heldout", "--heldout",
                                         help="sequences held out to measure the KL before and after"),
                   train_scale: bool = option(RouterDistillConfig, "train_scale", "--train-scale/--no-train-scale",
                                              help="also train one output scale per layer (folded into down_proj)"),
                   experts: bool = option(RouterDistillConfig, "train_experts", "--experts/--no-experts",
                                          help="train every MoE block whole: experts, shared expert and routers (after "
                                               "re-routing: lr 2e-4 measured best)"),
                   checkpoint_every: int = option(RouterDistillConfig, "checkpoint_every", "--checkpoint-every",
                                                  help="checkpoint every N steps (0: end only)"),
                   resume: bool = option(RouterDistillConfig, "resume", "--resume",
                                         help="continue from the newest checkpoint in --out"),
                   seed: int = option(RouterDistillConfig, "seed", "--seed", help="data order seed"),
                   overwrite: bool = OVERWRITE, dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST):
    """Forward-KL distillation (T = 1) of the student's routers (and a per-layer scale; with --experts its whole MoE
    blocks) from the original model."""
    from moekit.checkpoint.save import save_model
    from moekit.errors import MoekitError
    from moekit.train.router import RouterDistillConfig, distill_router_

    out = Path(out)
    final = out / "final"
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise MoekitError(f"output '{out}' is not empty: pass --resume to continue it or --overwrite to start over")
    cfg = RouterDistillConfig(steps=steps, max_tokens=max_tokens, lr=lr, batch_size=batch_size, seq_len=seq_len,
                              warmup_steps=warmup, heldout=heldout, train_scale=train_scale, train_experts=experts,
                              seed=seed, field=field,
                              out=str(out), checkpoint_every=checkpoint_every, resume=resume)
    cfg.validate()
    s_model, tok = load(student, "float32", device, trust_remote_code)
    t_model, _ = load(teacher, dtype, device, trust_remote_code)
    report = distill_router_(s_model, cfg, tokens=data, teacher=t_model, tokenizer=tok)
    save_model(s_model, tok, final, overwrite=True)
    write_json(out / "router_distill_report.json", report, overwrite=True)  # beside the model it just wrote
    kl = f"held-out KL {report['kl_heldout_before']:.4f} -> {report['kl_heldout_after']:.4f}; " if report["heldout_tokens"] else ""
    print(f"distilled the {'MoE blocks' if experts else 'routers'} ({report['trained_parameters']:,} parameters) for {report['steps_run']} steps "
          f"({report['tokens_run']:,} tokens) in {report['seconds']:.0f}s; {kl}model -> {final}")
