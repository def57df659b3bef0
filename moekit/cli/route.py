"""`moekit route`: fewer routed experts per token, with training-free mitigations."""

from __future__ import annotations

import json

from pathlib import Path

import typer

from moekit.cli import app
from moekit.cli.common import (DEVICE, DEVICE_MAP, DTYPE, FIELD, MAX_MEMORY, MODE, MODEL, OFFLOAD, OVERWRITE, TRUST,
                               load, mode_for, option, propagating_mode, tokenizer_of)
from moekit.route.route import RouteConfig

PER_LAYER = option(RouteConfig, "top_k_per_layer", "--per-layer",
                   help="explicit k per decoder layer, e.g. '3:4,4:2' (others keep top-k)")
MITIGATION = option(
    RouteConfig, "mitigations", "--mitigation", "-m",
    help="renorm, rescale, compensate, allocate, adaptive or super; repeat to combine (see moekit.route)",
)


def parse_per_layer(text: str | None) -> dict[int, int] | None:
    from moekit.errors import MoekitError

    if not text:
        return None
    out = {}
    for part in text.split(","):
        layer, sep, k = part.partition(":")
        if not sep or not layer.strip().isdigit() or not k.strip().isdigit():
            raise MoekitError(f"--per-layer '{text}' is not LAYER:K[,LAYER:K...] (e.g. '3:4,4:2')")
        out[int(layer)] = int(k)
    return out


@app.command()
def route(model: str = MODEL,
          top_k: float = option(RouteConfig, "top_k", "--top-k",
                                help="routed experts per token (the average, for allocate/adaptive)"),
          per_layer: str = PER_LAYER, mitigation: list[str] = MITIGATION,
          stats: str = typer.Option(..., "--stats", help="statistics file from `moekit profile` (compensate, super)"),
          data: str = typer.Option(None, "--data", help="calibration text (rescale, allocate, adaptive; measures k)"),
          field: str = FIELD, n_seq: int = typer.Option(16, help="calibration sequences"),
          seq_len: int = typer.Option(256, help="calibration sequence length"),
          adaptive_rule: str = option(RouteConfig, "adaptive_rule",
                                      help="adaptive: 'cumprob' (cumulative weight) or 'beta' (NAEE)"),
          threshold: float = option(RouteConfig, "threshold",
                                    help="adaptive threshold; default: calibrated to the --top-k budget"),
          rescale_mode: str = option(RouteConfig, "rescale_mode",
                                     help="rescale: 'lsq' (least squares, measured best) or 'norm' (match RMS)"),
          super_rule: str = option(RouteConfig, "super_rule", help="super experts: 'paper' or 'first75'"),
          keep_weights: bool = option(RouteConfig, "keep_weights", "--keep-weights",
                                            help="kept experts keep their original top-K weights (no renormalisation)"),
          out: str = typer.Option(..., "--out", help="output checkpoint directory"), overwrite: bool = OVERWRITE,
          mode: str = MODE,
          dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
          device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
          propagate: bool = typer.Option(False, "--propagate",
                                         help="error-propagating: fit layer i's rescale constant on the hidden states "
                                         "the already re-routed layers 0..i-1 produce (needs --data and --mitigation "
                                         "rescale; layer by layer). Without it every constant is fitted on the "
                                         "original model's states")):
    """Lower the experts each token activates (globally, per layer or per token) and save the model."""
    from moekit.data import calibration_tokens
    from moekit.checkpoint.save import save_model
    from moekit.outputs import check_output_dir
    from moekit.route.route import RouteConfig, route_
    from moekit.profile.stats import ExpertStats

    cfg = RouteConfig(top_k=top_k, top_k_per_layer=parse_per_layer(per_layer), mitigations=tuple(mitigation),
                      adaptive_rule=adaptive_rule, threshold=threshold, rescale_mode=rescale_mode, super_rule=super_rule,
                      keep_weights=keep_weights)
    cfg.validate()
    check_output_dir(out, overwrite)
    st = ExpertStats.load(stats)
    if propagate and "rescale" not in cfg.mitigations:
        from moekit.errors import MoekitError

        raise MoekitError("--propagate changes only rescale's constants: add --mitigation rescale or drop --propagate")
    placement = (device_map, max_memory, offload_folder)
    mode = propagating_mode(propagate, mode, data, placement, "route")
    if mode_for(model, mode, device, dtype, "route", *placement) == "sequential":
        from moekit.route.sequential import route_sequential

        tok = tokenizer_of(model, trust_remote_code)
        tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field) if data else None
        report = route_sequential(model, cfg, out, stats=st, tokens=tokens, overwrite=overwrite, device=device,
                                  dtype=dtype, propagate=propagate)
    else:
        m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
        tokens = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, model=m) if data else None
        report = route_(m, cfg, stats=st, tokens=tokens)
        save_model(m, tok, out, overwrite=overwrite)
    keys = ("top_k_original", "mitigations", "top_k_per_layer", "threshold", "super_experts", "average_active_experts",
            "routed_expert_compute_saved", "active_params_before", "active_params_after", "form")
    print(json.dumps({k: report[k] for k in keys}, indent=2, default=str))
    print(f"saved to {out} ({'plain transformers loads it' if report['form'] == 'standard' else 'load it with moekit'})")
