"""Pruning straight from safetensors shards, without loading the model (memory: about one shard).

The model is built on the meta device (no weights) with only its router weights read from disk, so the
same :func:`moekit.prune.prune_` decides which experts go and writes the new config. Then every shard is
read once and written once:

* per-expert tensors (``...layers.L.<block>.experts.E.<name>``, the form transformers 5 saves for most
  families) are dropped or renamed to the expert's new index;
* fused expert tensors (``...layers.L.<block>.experts.<name>`` with experts on dim 0, GPT-OSS) and router
  tensors (``...layers.L.<block>.<router>.<name>``) keep the surviving rows;
* everything else is copied unchanged (bytes move file to file, see :mod:`moekit.shard_io`);
  the index json, config and every other file (tokenizer, generation config, chat template) follow.

The output is written to a temporary directory beside ``out`` and renamed into place. The result is a
standard checkpoint; a pruning that leaves different expert counts per layer must go through the
in-memory path (``moekit prune`` without ``--shardwise``) or be made uniform.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.errors import MoekitError, reading
from moekit.outputs import check_output_dir, staged_dir, write_json
from moekit.checkpoint.paths import non_uniform_weights
from moekit.checkpoint.read import restore_moekit_state
from moekit.prune.prune import PruneConfig, prune_
from moekit.checkpoint.safetensors_io import read_header, write_subset
from moekit.profile.stats import ExpertStats

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXPERT_KEY = re.compile(r"^(?P<pre>(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>[\w.]+?)\.experts\.)(?P<rest>.+)$")


def shard_map(src: Path) -> dict[str, str]:
    """tensor name -> shard file name."""
    if (src / INDEX).exists():
        return dict(json.loads((src / INDEX).read_text())["weight_map"])
    if (src / SINGLE).exists():
        return {k: SINGLE for k in read_header(src / SINGLE)[0]}
    raise MoekitError(f"'{src}' has neither {INDEX} nor {SINGLE}: shard-wise pruning needs a safetensors checkpoint")


class DiskLayout:
    """Where each MoE layer's experts and router live in the checkpoint's tensor names."""

    def __init__(self, keys, router_attr: str):
        self.blocks: dict[int, str] = {}  # layer -> "....layers.L.<block>."
        for k in keys:
            m = EXPERT_KEY.match(k)
            if m:
                prefix = m["pre"][: -len("experts.")]
                if self.blocks.setdefault(int(m["layer"]), prefix) != prefix:
                    raise MoekitError(
                        f"layer {m['layer']} has experts under two blocks; not a checkpoint moekit understands"
                    )
        self.router_attr = router_attr

    def router_key(self, layer: int, name: str = "weight") -> str:
        return f"{self.blocks[layer]}{self.router_attr}.{name}"

    def rewrite(self, key: str, t_shape, keep: dict[int, list[int]], counts: dict[int, int]):
        """(new key, rows to keep or None for 'as is') for ``key``; new key None means 'drop'."""
        m = EXPERT_KEY.match(key)
        if m and int(m["layer"]) in keep:
            layer, rest = int(m["layer"]), m["rest"]
            head, _, tail = rest.partition(".")
            if head.isdigit():  # per-expert tensor
                e = int(head)
                kept = keep[layer]
                if e not in kept:
                    return None, None
                return f"{m['pre']}{kept.index(e)}.{tail}", None
            return key, self._rows(key, t_shape, layer, keep, counts)  # fused experts
        for layer, prefix in self.blocks.items():
            if layer in keep and key.startswith(f"{prefix}{self.router_attr}."):
                return key, self._rows(key, t_shape, layer, keep, counts)
        return key, None

    @staticmethod
    def _rows(key, shape, layer, keep, counts):
        if not shape or shape[0] != counts[layer]:
            raise MoekitError(
                f"'{key}' has shape {list(shape)}, expected {counts[layer]} experts on dim 0; "
                "prune this checkpoint in memory instead (drop --shardwise)"
            )
        return keep[layer]


def _meta_model(src: Path, routers: dict[str, torch.Tensor]):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    arch.check_supported(config)
    from transformers.initialization import no_init_weights

    with init_empty_weights(), no_init_weights():  # no weights and no initialisation: only shapes are needed
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    model.tie_weights()  # no_init_weights skips tying; parameter counts must see tied embeddings once
    restore_moekit_state(model)
    for layer in arch.require_moe(model):
        r = layer.router_linear
        owner = layer.selection_bias_owner
        if layer.num_zero_experts:  # the meta view's keep_experts rewrites router rows as the real experts only
            raise MoekitError(f"'{src}' ({arch.model_type(config)}) has zero (identity) experts, whose router rows "
                              "shard-wise pruning does not keep; prune it in memory (drop --shardwise)")
        if owner is not None and owner[0] is not r:  # only the router's own tensors are rewritten (experts on dim 0)
            where = "on the MoE block" if owner[0] is layer.block else f"in {layer.family.selection_bias_attr}"
            raise MoekitError(f"'{src}' ({arch.model_type(config)}) keeps its selection bias {where}, which "
                              "shard-wise pruning does not rewrite; prune it in memory (drop --shardwise)")
        for name, t in routers.get(layer.index, {}).items():
            if name == "e_score_correction_bias":
                r.e_score_correction_bias = t
            else:
                setattr(r, name, torch.nn.Parameter(t, requires_grad=False))
    return model


def _read_routers(src: Path, wmap: dict[str, str], layout: DiskLayout) -> dict[int, dict[str, torch.Tensor]]:
    """Router tensors per MoE layer, each shard opened once."""
    from safetensors import safe_open

    wanted: dict[str, list[tuple[int, str, str]]] = {}
    for layer in layout.blocks:
        for name in ("weight", "bias", "e_score_correction_bias"):
            key = layout.router_key(layer, name)
            if key in wmap:
                wanted.setdefault(wmap[key], []).append((layer, name, key))
    out: dict[int, dict[str, torch.Tensor]] = {}
    for shard, items in wanted.items():
        with safe_open(str(src / shard), "pt") as f:
            for layer, name, key in items:
                out.setdefault(layer, {})[name] = f.get_tensor(key)
    return out


def load_meta(src: str | Path):
    """The checkpoint's model on the meta device, with its real router weights (enough for fingerprint, planning
    and parameter counts); also returns the tensor->shard map and the disk layout."""
    from transformers import AutoConfig

    src = Path(src).expanduser()
    wmap = shard_map(src)
    for shard in sorted(set(wmap.values())):
        read_header(src / shard)  # a shard cut short or with a bad header is refused before any work
    with reading(src, "checkpoint", "re-download it or save it again"):
        family = arch.MOE_FAMILIES.get(arch.model_type(AutoConfig.from_pretrained(src)))
    if family is None:
        raise MoekitError(
            f"'{src}' is not an MoE checkpoint moekit supports; shard-wise pruning needs one of "
            f"{', '.join(arch.MOE_FAMILIES)}"
        )
    layout = DiskLayout(wmap, family.router_attr)
    return _meta_model(src, _read_routers(src, wmap, layout)), wmap, layout


def prune_shards(
    src: str | Path, stats: ExpertStats, cfg: PruneConfig, out: str | Path, *, overwrite: bool = False
) -> dict:
    """Prune the checkpoint directory ``src`` into ``out`` shard by shard; return the same report as prune_."""
    src = Path(src).expanduser()
    if not (src / "config.json").exists():
        raise MoekitError(
            f"'{src}' is not a checkpoint directory (no config.json); shard-wise pruning needs a local directory"
        )
    if non_uniform_weights(src) is not None:
        raise MoekitError(f"'{src}' is in moekit's non-uniform form; prune it in memory (drop --shardwise)")
    out = check_output_dir(out, overwrite)
    model, wmap, layout = load_meta(src)
    counts = {layer.index: layer.num_experts for layer in arch.moe_layers(model)}
    missing = [i for i in counts if i not in layout.blocks]
    if missing:
        raise MoekitError(
            f"no expert tensors found on disk for MoE layers {missing}; is '{src}' a standard checkpoint?"
        )
    report = prune_(model, cfg, stats=stats)
    if not arch.is_uniform(model):
        raise MoekitError(
            "this pruning leaves different expert counts per layer, which shard-wise pruning cannot write; "
            "use --budget uniform, or drop --shardwise"
        )
    keep = {r["layer"]: r["kept"] for r in report["layers"] if r["experts_after"] != r["experts_before"]}

    with staged_dir(out, overwrite) as tmp:
        new_map, total = {}, 0
        shards = sorted(set(wmap.values()))
        for shard in tqdm(shards, desc="pruning shards", leave=False):
            infos, meta, data_start = read_header(src / shard)
            items = []
            for key, info in infos.items():
                new_key, rows = layout.rewrite(key, info.shape, keep, counts)
                if new_key is not None:
                    items.append((new_key, info, rows))
                    new_map[new_key] = shard
            total += write_subset(src / shard, tmp / shard, items, meta, data_start)
        if (src / INDEX).exists():
            index = json.loads((src / INDEX).read_text())
            index["metadata"] = dict(index.get("metadata") or {}, total_size=total)
            index["weight_map"] = dict(sorted(new_map.items()))
            write_json(tmp / INDEX, index)
        model.config.save_pretrained(tmp)
        _copy_other_files(src, tmp)
        _check_written(new_map, model)
    return report


def _copy_other_files(src: Path, dst: Path) -> None:
    skip = {INDEX, "config.json"}
    for p in src.iterdir():
        if p.name in skip or p.name.endswith(".safetensors") or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def _check_written(written: dict[str, str], model) -> None:
    """Cheap structural check: every MoE layer written holds the expert count the new config says."""
    found: dict[int, set[int]] = {}
    for k in written:
        m = EXPERT_KEY.match(k)
        head = m["rest"].split(".", 1)[0] if m else ""
        if head.isdigit():
            found.setdefault(int(m["layer"]), set()).add(int(head))
    for layer in arch.moe_layers(model):
        per = found.get(layer.index)
        if per and per != set(range(layer.num_experts)):
            raise MoekitError(
                f"layer {layer.index}: wrote experts {sorted(per)[:5]}..., expected 0..{layer.num_experts - 1}; "
                "this is a moekit bug"
            )
