"""`moekit profile` (one-pass expert statistics) and `moekit ablate` (skip experts, measure the damage)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from moekit.cli import app
from moekit.outputs import write_json
from moekit.cli.common import (DATA, DEVICE, DEVICE_MAP, DTYPE, FIELD, MAX_MEMORY, MODE, MODEL, OFFLOAD, TRUST, load,
                               mode_for, option, tokenizer_of)
from moekit.profile.profile import ProfileConfig


def _check_out(out: Path, overwrite: bool) -> Path:
    from moekit.errors import MoekitError

    out = Path(out)
    if out.is_dir():
        raise MoekitError(f"--out '{out}' is a directory: give a file name such as {out / 'stats.safetensors'}")
    if out.exists() and not overwrite:
        raise MoekitError(f"'{out}' exists: pass --overwrite to replace it, or choose another --out")
    return out


@app.command()
def profile(model: str = MODEL, data: str = DATA, out: Path = typer.Option(..., "--out", help="statistics file to write (.safetensors)"),
            field: str = FIELD, n_seq: int = typer.Option(32, "--n-seq", help="calibration sequences"),
            seq_len: int = typer.Option(512, "--seq-len", help="tokens per sequence"),
            batch_size: int = option(ProfileConfig, "batch_size", "--batch-size", help="sequences per forward pass"),
            mode: str = MODE,
            stream: bool = typer.Option(False, "--stream", help="the same as --mode sequential (kept for old scripts)"),
            gram: int = option(ProfileConfig, "gram_tokens", "--gram",
                               help="also the Gram matrix of expert outputs on N sampled tokens"),
            attn_sink: bool = option(ProfileConfig, "attn_sink", "--attn-sink",
                                     help="also attention mass on the first token (eager attention)"),
            plots: Path = typer.Option(None, "--plots", help="write PNG plots into this directory"),
            rule: str = typer.Option("paper", "--rule", help="super-expert rule: 'paper' or 'first75'"),
            seed: int = option(ProfileConfig, "seed", "--seed", help="data shuffling and Gram sample seed"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing statistics file"),
            dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
            device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD):
    """One forward pass over calibration data; every expert statistic compression needs, saved to --out."""
    from moekit.data import calibration_tokens, describe_source
    from moekit.errors import MoekitError
    from moekit.profile.profile import ProfileConfig
    from moekit.profile.profile import profile as run_profile
    from moekit.profile.stats import massive_layers, super_experts, super_shared_experts

    out = _check_out(out, overwrite)
    mode = mode_for(model, "sequential" if stream else mode, device, dtype, "profile", device_map, max_memory,
                    offload_folder)
    stream = mode == "sequential"
    if stream and data == "self":
        raise MoekitError("the layer-sequential mode cannot sample 'self' text (that needs the whole model in memory): "
                          "give a data file")
    if stream:
        from moekit.profile.stream import profile_stream

        tok = tokenizer_of(model, trust_remote_code)
        tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, seed=seed)
    else:
        m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
        from moekit.core.arch import require_moe

        require_moe(m)  # a dense model fails here, before the data is read
        tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, seed=seed, model=m)
    cfg = ProfileConfig(batch_size=batch_size, gram_tokens=gram, attn_sink=attn_sink, seed=seed,
                        data=describe_source(data, field, tokens, seed))
    t0 = time.perf_counter()
    stats = profile_stream(model, tokens, cfg, device=device, dtype=dtype) if stream else run_profile(m, cfg, tokens=tokens)
    elapsed = time.perf_counter() - t0
    stats.meta["model"] = str(model)
    stats.save(out, overwrite=overwrite)
    print(f"profiled {len(stats.layers)} MoE layers on {stats.tokens:,} tokens in {elapsed:.1f}s"
          f"{' (layer-sequential)' if stream else ''} -> {out}")
    print(f"massive activations form at layers {massive_layers(stats)}; super experts ({rule} rule): "
          f"{super_experts(stats, rule=rule)}; shared experts above the threshold in layers "
          f"{super_shared_experts(stats, rule=rule)}")
    if plots is not None:
        from moekit.profile.plots import write_plots

        for p in write_plots(stats, plots, rule=rule):
            print(f"plot: {p}")


@app.command()
def ablate(model: str = MODEL, data: str = DATA, field: str = FIELD,
           experts: str = typer.Option(None, "--experts", help="experts to skip: 'LAYER,EXPERT;LAYER,EXPERT'"),
           super_experts_: bool = typer.Option(False, "--super-experts", help="skip the super experts (from --stats, "
                                               "or profiled on the evaluation windows)"),
           random_n: int = typer.Option(None, "--random", help="skip N experts drawn at random"),
           control: bool = typer.Option(True, "--control/--no-control", help="also ablate as many random experts"),
           stats_file: Path = typer.Option(None, "--stats", help="statistics file for --super-experts"),
           rule: str = typer.Option("paper", "--rule", help="super-expert rule: 'paper' or 'first75'"),
           max_tokens: int = typer.Option(16384, help="score the first N tokens"),
           window: int = typer.Option(1024, help="non-overlapping window length"),
           batch_size: int = option(ProfileConfig, "batch_size", "--batch-size", help="windows per forward pass"),
           seed: int = typer.Option(0, "--seed", help="seed of the random experts"),
           json_out: Path = typer.Option(None, "--json", help="also write the results to this JSON file"),
           mode: str = MODE, dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
           device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD):
    """Skip experts where routed (no renormalisation); perplexity and attention-sink decay D_sink per layer."""
    from moekit.core.arch import require_moe
    from moekit.errors import MoekitError
    from moekit.eval.perplexity import windows
    from moekit.profile import ablate as abl
    from moekit.profile.profile import ProfileConfig
    from moekit.profile.stats import ExpertStats, super_experts

    if sum([experts is not None, super_experts_, random_n is not None]) != 1:
        raise MoekitError("choose exactly one of --experts 'L,E;...', --super-experts or --random N")
    sequential = mode_for(model, mode, device, dtype, "ablate", device_map, max_memory, offload_folder) == "sequential"
    if sequential:  # the model's structure on the meta device; each run reads the checkpoint layer by layer
        from moekit.sequential.engine import LayerSequential

        walk = LayerSequential(model, device=device, dtype=dtype)
        walk.read_routers()  # what a statistics file's fingerprint is checked against
        path, m, tok = walk.path, walk.model, tokenizer_of(model, trust_remote_code)
        kw = dict(batch_size=batch_size, device=device, dtype=dtype)
        measure = lambda chosen=None: abl.measure_sequential(path, toks, chosen, desc="ppl (intact)", **kw)  # noqa: E731
        run_ablate = lambda chosen, base: abl.ablate_sequential(path, toks, chosen, baseline=base, **kw)  # noqa: E731
    else:
        m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
        measure = lambda: abl.measure(m, toks, batch_size=batch_size, desc="ppl (intact)")  # noqa: E731
        run_ablate = lambda chosen, base: abl.ablate(m, toks, chosen, batch_size=batch_size, baseline=base)  # noqa: E731
    require_moe(m)
    toks = windows(tok, data, max_tokens=max_tokens, window=window, field=field)
    if experts is not None:
        chosen = abl.parse_experts(experts)
    elif random_n is not None:
        chosen, control = abl.random_experts(m, random_n, seed=seed), False
    else:
        if stats_file is not None:
            st = ExpertStats.load(stats_file)
            st.check_model(m)
        elif sequential:
            from moekit.profile.stream import profile_stream

            st = profile_stream(path, toks, ProfileConfig(batch_size=batch_size), device=device, dtype=dtype)
        else:
            from moekit.profile.profile import profile

            st = profile(m, ProfileConfig(batch_size=batch_size), tokens=toks)
        chosen = super_experts(st, rule=rule)
        if not chosen:
            raise MoekitError(f"no super experts found by the '{rule}' rule; try --rule first75 or name --experts")
    abl.check_experts(m, chosen)  # before any pass over the data
    base = measure()
    runs = {"ablated": run_ablate(chosen, base)}
    if control:
        rnd = abl.random_experts(m, len(chosen), seed=seed, exclude=chosen)
        runs["random control"] = run_ablate(rnd, base)
    print(f"perplexity intact {base[0]:.3f} over {toks.numel():,} tokens of {data}")
    for name, r in runs.items():
        d = ", ".join(f"{i}:{v:+.3f}" for i, v in enumerate(r.d_sink))
        print(f"{name}: experts {r.experts} -> perplexity {r.ppl_after:.3f} ({r.ppl_after / r.ppl_before:.2f}x); D_sink {d}")
    if json_out is not None:
        write_json(json_out, {k: r.as_dict() for k, r in runs.items()}, indent=1)
