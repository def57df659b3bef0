"""Every compression method, imported so that each registers its verb with :mod:`moekit.core.registry`.

    import moekit.methods                        # or just `import moekit`; moekit.apply_ imports this
    moekit.apply_(model, PruneConfig(ratio=0.25), stats=stats)

A new method adds one line here (see docs/architecture.md).
"""

from moekit.carve import carve as _carve  # noqa: F401  carve (dense -> MoE)
from moekit.carve import heal as _heal  # noqa: F401  heal_
from moekit.core.registry import METHODS, apply_, method
from moekit.densify import densify as _densify  # noqa: F401  densify (MoE -> dense)
from moekit.densify import neuron_prune as _neuron_prune  # noqa: F401  prune_neurons_
from moekit.merge import merge as _merge  # noqa: F401  merge_
from moekit.profile import profile as _profile  # noqa: F401  profile
from moekit.prune import prune as _prune  # noqa: F401  prune_
from moekit.route import route as _route  # noqa: F401  route_
from moekit.train import distill as _distill  # noqa: F401  distill_
from moekit.train import router as _router  # noqa: F401  distill_router_

__all__ = ["METHODS", "apply_", "method"]
