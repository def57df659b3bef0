"""Methods registered by config class: one verb shape, looked up instead of kept in hand-synced tables.

Every method is a function ``verb(model, cfg, *, stats=None, tokens=None, teacher=None)``. In-place methods
(prune, merge, route, heal, distill) change ``model`` and return their report; the two that build a model of
another class (carve: dense -> MoE, densify: MoE -> dense) return the new model. Each method module registers
itself with :func:`register`, so the recipe runner and the CLI find a method from its config or step name:

    @register("prune", PruneConfig, needs=("stats",))
    def prune_(model, cfg, *, stats=None, tokens=None, teacher=None): ...

    moekit.apply_(model, PruneConfig(ratio=0.25), stats=stats)    # dispatched by the config's class

``needs`` names the inputs the method cannot run without, ``uses`` those it takes when they are there; the
recipe runner supplies both (profiling the current model for ``stats``, reading calibration text for
``tokens``, keeping the model before a carve/densify as ``teacher``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moekit.errors import MoekitError

INPUTS = ("stats", "tokens", "teacher")


@dataclass(frozen=True)
class Method:
    name: str  # recipe step and CLI command
    config: type
    verb: Callable
    needs: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()  # optional inputs, passed when available
    new_model: bool = False  # returns a new model (carve, densify) instead of changing its argument


METHODS: dict[str, Method] = {}


def register(name: str, config: type, *, needs: tuple[str, ...] = (), uses: tuple[str, ...] = (),
             new_model: bool = False) -> Callable:
    unknown = (set(needs) | set(uses)) - set(INPUTS)
    if unknown:
        raise ValueError(f"method '{name}' needs unknown inputs {sorted(unknown)}; known: {INPUTS}")

    def wrap(verb: Callable) -> Callable:
        if name in METHODS and METHODS[name].verb is not verb:
            raise ValueError(f"method '{name}' is registered twice ({METHODS[name].verb.__module__}, {verb.__module__})")
        METHODS[name] = Method(name, config, verb, tuple(needs), tuple(uses), new_model)
        return verb

    return wrap


def method(name_or_config: str | type | Any) -> Method:
    """The registered method for a step name, a config class or a config object."""
    if isinstance(name_or_config, str):
        if name_or_config not in METHODS:
            raise MoekitError(f"unknown method '{name_or_config}' (known: {', '.join(sorted(METHODS))})")
        return METHODS[name_or_config]
    cls = name_or_config if isinstance(name_or_config, type) else type(name_or_config)
    for m in METHODS.values():
        if m.config is cls:
            return m
    raise MoekitError(f"no moekit method takes a {cls.__name__}; pass one of "
                      f"{', '.join(m.config.__name__ for m in METHODS.values())}")


def apply_(model, cfg, *, stats=None, tokens=None, teacher=None):
    """Run the method that ``cfg``'s class is registered for; returns what the method returns."""
    m = method(cfg)
    given = {"stats": stats, "tokens": tokens, "teacher": teacher}
    missing = [k for k in m.needs if given[k] is None]
    if missing:
        raise MoekitError(f"{m.name} needs {' and '.join(missing)}: pass {', '.join(f'{k}=...' for k in missing)}")
    return m.verb(model, cfg, **given)
