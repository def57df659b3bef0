"""moekit: make Mixture-of-Experts language models smaller and cheaper, with honest numbers.

The Python API reads top-down:

    model, tok = moekit.load_model("smollm2-moe")                     # checkpoint/load.py
    layers = moekit.moe_layers(model)                                 # core/arch.py: one view of every MoE family
    stats = moekit.apply_(model, moekit.ProfileConfig(), tokens=t)   # profile/profile.py: profile()
    report = moekit.apply_(model, moekit.PruneConfig(ratio=0.25), stats=stats)   # dispatched by config class
    moekit.save_model(model, tok, "out/")                             # checkpoint/save.py: atomic, verified

Every method has one shape, ``verb(model, cfg, *, stats=None, tokens=None, teacher=None)``: the in-place
verbs (``prune_``, ``merge_``, ``route_``, ``heal_``, ``distill_``, ``prune_neurons_``) return their report;
``carve`` and ``densify`` return the new model; ``profile`` returns the statistics. Those three are reached
as ``moekit.apply_`` or from their modules (``moekit.profile``, ``moekit.carve`` and ``moekit.densify`` name the
subpackages, so the functions are not re-exported here under the same names).
"""

from moekit.version import __version__  # noqa: E402

from moekit.carve.carve import CarveConfig
from moekit.carve.heal import HealConfig, heal_
from moekit.checkpoint.load import load_model
from moekit.checkpoint.save import save_model
from moekit.core.arch import MoELayer, describe, moe_layers, param_counts
from moekit.densify.densify import DensifyConfig
from moekit.densify.neuron_prune import NeuronPruneConfig, prune_neurons_
from moekit.errors import MoekitError
from moekit.merge.merge import MergeConfig, merge_
from moekit.methods import apply_
from moekit.profile.profile import ProfileConfig
from moekit.prune.prune import PruneConfig, prune_
from moekit.route.route import RouteConfig, route_
from moekit.train.distill import DistillConfig, distill_

__all__ = [
    "CarveConfig", "DensifyConfig", "DistillConfig", "HealConfig", "MergeConfig", "MoELayer", "MoekitError",
    "NeuronPruneConfig", "ProfileConfig", "PruneConfig", "RouteConfig", "__version__", "apply_",
    "describe", "distill_", "heal_", "load_model", "merge_", "moe_layers", "param_counts", "prune_",
    "prune_neurons_", "route_", "save_model",
]
