"""Forward hooks that are always removed: the one way moekit looks inside a running model.

    with Hooks() as hooks:
        hooks.forward(layer.router, lambda module, args, out: seen.append(out))
        hooks.pre(layer.block, lambda module, args: inputs.append(args[0]))
        model(ids)
    # every hook is gone here, also when the forward raised

``StopForward`` ends a forward early once a hook has what it needs (the layer inputs of a calibration
pass, say); :func:`inputs_of` is that pattern for the first call of one module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end the model's forward pass early; :class:`Hooks` swallows it on exit."""


class Hooks:
    """A set of forward (and pre-forward) hooks removed together when the ``with`` block ends."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> None:
        """``fn(module, args, output)`` (``fn(module, args, kwargs, output)`` with ``with_kwargs``) after ``module`` runs."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def pre(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> None:
        """``fn(module, args)`` (``fn(module, args, kwargs)`` with ``with_kwargs``) before ``module`` runs."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return exc_type is StopForward  # a hook ended the forward on purpose


def inputs_of(model: nn.Module, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """The positional and keyword arguments ``module`` receives on its first call during ``model(*args, **kwargs)``;
    the rest of the forward pass is skipped."""
    seen: list[tuple[tuple, dict]] = []

    def grab(_module, a, kw):
        seen.append((a, kw))
        raise StopForward

    with Hooks() as hooks:
        hooks.pre(module, grab, with_kwargs=True)
        model(*args, **kwargs)
    if not seen:
        raise RuntimeError(f"{type(module).__name__} never ran during the forward pass")
    return seen[0]
