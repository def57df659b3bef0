"""`moekit carve` (dense -> MoE, CMoE) and `moekit heal` (repair an MoE against a teacher)."""

from __future__ import annotations

import json

from pathlib import Path

import typer

from moekit.carve.carve import CarveConfig
from moekit.carve.heal import HealConfig
from moekit.cli import app
from moekit.cli.common import (DATA, DEVICE, DEVICE_MAP, DTYPE, FIELD, MAX_MEMORY, MODE, MODEL, OFFLOAD, OVERWRITE, TRUST,
                               load, mode_for, option, tokenizer_of)

OUT = typer.Option(..., "--out", help="output checkpoint directory (written atomically)")
N_SEQ = typer.Option(16, "--n-seq", help="calibration sequences")
SEQ_LEN = typer.Option(512, "--seq-len", help="tokens per calibration sequence")
SEED = option(HealConfig, "seed", "--seed", help="calibration shuffling seed")
HEAL_EPOCHS = option(HealConfig, "local_epochs", "--local-epochs",
                     help="layer-wise local reconstruction epochs (0 = off)")


def _heal_config(router: bool, lstsq: bool, local_epochs: int, distill_steps: int, finetune: str, finetune_steps: int,
                 seed: int):
    from moekit.carve.heal import HealConfig

    return HealConfig(router=router, lstsq=lstsq, local_epochs=local_epochs, distill_steps=distill_steps,
                      finetune=finetune, finetune_steps=finetune_steps, seed=seed)


def _summary(report: dict) -> dict:
    """Mean relative FFN error over the healed layers after each stage."""
    layers = report.get("layers", {})
    if not layers:
        return {}
    keys = [k for k, v in next(iter(layers.values())).items() if isinstance(v, float)]
    return {k: round(sum(v[k] for v in layers.values()) / len(layers), 4) for k in keys}


@app.command("carve")
def carve_cmd(
    model: str = MODEL,
    experts: int = option(CarveConfig, "experts", "--experts",
                          help="N: experts per FFN (shared included); must divide the FFN width"),
    shared: int = option(CarveConfig, "shared", "--shared",
                         help="N_s: experts' worth of neurons in the always-on shared expert"),
    active: int = option(CarveConfig, "active", "--active", help="N_k: routed experts per token (top-k)"),
    k_a: int = option(CarveConfig, "k_a", "--k-a", help="K_a: neurons each token marks for activation rates"),
    iterations: int = option(CarveConfig, "iterations", "--iterations",
                             help="balanced clustering rounds; 0 = until convergence"),
    data: str = DATA, field: str = FIELD, n_seq: int = N_SEQ, seq_len: int = SEQ_LEN, seed: int = SEED,
    heal: bool = typer.Option(True, "--heal/--no-heal", help="heal after carving (router fit, least squares, local)"),
    local_epochs: int = HEAL_EPOCHS,
    out: str = OUT, overwrite: bool = OVERWRITE, dtype: str = DTYPE, device: str = DEVICE,
    device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
    trust_remote_code: bool = TRUST,
):
    """Carve a dense Llama/Mistral/Qwen2/Qwen3 model into a standard MoE checkpoint (CMoE), optionally healed."""
    from moekit.carve.carve import CarveConfig, carve, check_config
    from moekit.data import calibration_tokens
    from moekit.checkpoint.save import save_model
    from moekit.outputs import check_output_dir
    from moekit.carve.heal import heal_

    target = check_output_dir(out, overwrite)
    cfg = CarveConfig(experts=experts, shared=shared, active=active, k_a=k_a, iterations=iterations)
    dense, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
    check_config(dense, cfg)
    calib = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, seed=seed, model=dense)
    moe = carve(dense, cfg, tokens=calib)
    summary = {"carve": moe.config.moekit_carve}
    if heal:
        hcfg = _heal_config(True, True, local_epochs, 0, "none", 0, seed)
        summary["heal_relative_error"] = _summary(heal_(moe, hcfg, tokens=calib, teacher=dense))
    save_model(moe.to(dense.dtype), tok, target, overwrite=overwrite)
    print(json.dumps(summary, default=str))
    print(f"carved MoE written to {target}")


@app.command("heal")
def heal_cmd(
    model: str = MODEL,
    teacher: str = typer.Option(..., "--teacher", help="the model to reproduce (the dense source, or the MoE before compression)"),
    data: str = DATA, field: str = FIELD, n_seq: int = N_SEQ, seq_len: int = SEQ_LEN, seed: int = SEED,
    router: bool = option(HealConfig, "router", "--router/--no-router", help="closed-form (ridge) router fit"),
    lstsq: bool = option(HealConfig, "lstsq", "--lstsq/--no-lstsq", help="least-squares refit of the down projections"),
    local_epochs: int = HEAL_EPOCHS,
    distill_steps: int = option(HealConfig, "distill_steps", "--distill-steps",
                                help="end-to-end KL distillation steps (GPU advised)"),
    finetune: str = option(HealConfig, "finetune", "--finetune",
                           help="none, lora (r=8, alpha=32, merged back) or router"),
    finetune_steps: int = option(HealConfig, "finetune_steps", "--finetune-steps", help="fine-tuning steps"),
    out: str = OUT, overwrite: bool = OVERWRITE, mode: str = MODE, dtype: str = DTYPE, device: str = DEVICE,
    device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
    trust_remote_code: bool = TRUST,
):
    """Heal an MoE (carved, pruned or merged) toward a teacher, layer by layer, and save it."""
    from moekit.data import calibration_tokens
    from moekit.checkpoint.save import save_model
    from moekit.errors import MoekitError
    from moekit.outputs import check_output_dir
    from moekit.carve.heal import heal_

    target = check_output_dir(out, overwrite)
    hcfg = _heal_config(router, lstsq, local_epochs, distill_steps, finetune, finetune_steps, seed)
    if mode_for(model, mode, device, dtype, "heal", device_map, max_memory, offload_folder) == "sequential":
        from moekit.carve.sequential import heal_sequential

        if data == "self":
            raise MoekitError("the layer-sequential mode cannot sample 'self' text (that needs the whole model in "
                              "memory): give a data file")
        calib = calibration_tokens(data, tokenizer_of(model, trust_remote_code), n_seq=n_seq, seq_len=seq_len,
                                   field=field, seed=seed)
        report = heal_sequential(model, teacher, hcfg, target, tokens=calib, overwrite=overwrite, device=device,
                                 dtype=dtype)
        print(json.dumps({"heal_relative_error": _summary(report)}))
        print(f"healed MoE written to {target}")
        return
    moe, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
    teach, _ = load(teacher, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
    calib = calibration_tokens(data, tok, n_seq=n_seq, seq_len=seq_len, field=field, seed=seed, model=teach)
    report = heal_(moe, hcfg, tokens=calib, teacher=teach)
    save_model(moe, tok, target, overwrite=overwrite)
    print(json.dumps({"heal_relative_error": _summary(report)}))
    print(f"healed MoE written to {target}")
