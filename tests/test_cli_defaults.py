"""One source of defaults: every CLI option that stands for a config field defaults to that field's default.

An option is tied to a field either explicitly (``moekit.cli.common.option`` records ``config_field``) or by
name: a parameter named like a field of a config its command builds. The second catches a default written
by hand (``typer.Option(8, "--shared")`` next to ``CarveConfig.shared = 4``).
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import typer

import moekit.methods
from moekit.carve.carve import CarveConfig
from moekit.carve.heal import HealConfig
from moekit.cli import app
from moekit.cli import common
from moekit.cli.common import field_default, option
from moekit.pipeline.recipe import EvalStep

# commands that build more than one config (a command named like a registered method builds that method's config;
# `eval` builds none by name: its --tasks list is the command's own, EvalStep.tasks=[] means "perplexity only",
# and its tied options are checked through config_field)
EXTRA_CONFIGS = {"carve": [HealConfig]}
# the model-loading options every command shares; DistillConfig.device is the training device, not these
LOADING = {id(common.DTYPE), id(common.DEVICE), id(common.TRUST), id(common.OVERWRITE)}


def command_configs(name: str) -> list[type]:
    configs = list(EXTRA_CONFIGS.get(name, []))
    if name in moekit.methods.METHODS:
        configs.insert(0, moekit.methods.METHODS[name].config)
    return configs


def drifted(callback, configs: list[type]) -> list[str]:
    """Options of ``callback`` whose default differs from the config field they stand for."""
    problems = []
    for pname, param in inspect.signature(callback).parameters.items():
        info = param.default
        if not isinstance(info, typer.models.OptionInfo) or id(info) in LOADING:
            continue
        tied = getattr(info, "config_field", None)
        if tied is None:
            owners = [c for c in configs if pname in {f.name for f in dataclasses.fields(c)}]
            if not owners:
                continue
            tied = (owners[0], pname)
        cls, field = tied
        expected = field_default(cls, field)
        if info.default is not ... and info.default != expected:
            problems.append(f"--{pname.replace('_', '-')} defaults to {info.default!r}, {cls.__name__}.{field} to {expected!r}")
    return problems


COMMANDS = [(c.name or c.callback.__name__, c.callback) for c in app.registered_commands]


def test_the_method_commands_are_all_checked():
    names = {n for n, _ in COMMANDS}
    assert {"profile", "prune", "merge", "route", "carve", "heal", "densify", "distill", "eval"} <= names
    for name in ("profile", "prune", "merge", "route", "carve", "heal", "densify", "distill"):
        assert command_configs(name), name


@pytest.mark.parametrize("name,callback", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_option_defaults_equal_config_defaults(name, callback):
    assert drifted(callback, command_configs(name)) == []


def test_the_drift_from_the_issue_is_caught():
    """The two defaults that had drifted (carve --shared 8, --local-epochs 2) are reported when planted."""

    def carve_cmd(shared: int = typer.Option(8, "--shared"), local_epochs: int = typer.Option(2, "--local-epochs"),
                  experts: int = option(CarveConfig, "experts", "--experts")):
        pass

    problems = drifted(carve_cmd, [CarveConfig, HealConfig])
    assert len(problems) == 2
    assert "CarveConfig.shared" in problems[0] and "HealConfig.local_epochs" in problems[1]


def test_an_explicitly_tied_option_is_checked_under_another_name():
    info = option(EvalStep, "batch_size", "--bs")
    info.default = 99  # as if someone edited the literal after tying it

    def cmd(bs: int = info):
        pass

    assert drifted(cmd, []) == [f"--bs defaults to 99, EvalStep.batch_size to {EvalStep.batch_size!r}"]
