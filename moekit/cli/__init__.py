"""The ``moekit`` command: a thin layer over the Python API, one file per command group.

Every command turns a :class:`moekit.MoekitError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="moekit",
    help="Make Mixture-of-Experts language models smaller and cheaper, with honest numbers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module registers its commands on `app` when imported.
from moekit.cli import basic
from moekit.cli import carve
from moekit.cli import densify
from moekit.cli import evaluate
from moekit.cli import merge
from moekit.cli import profile
from moekit.cli import prune
from moekit.cli import route
from moekit.cli import run
from moekit.cli import serve
from moekit.cli.checks import checked

for _command in app.registered_commands:  # every command's inputs are checked before its body runs
    _command.callback = checked(_command.callback)


def main(argv: list[str] | None = None) -> None:
    from moekit.errors import MoekitError, explain

    try:
        app(args=argv, standalone_mode=True)
    except MoekitError as e:
        print(f"moekit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a full disk, a read-only folder, CUDA memory: one line; anything else is a bug
        line = explain(e)
        if line is None:
            raise
        print(f"moekit: error: {line}", file=sys.stderr)
        sys.exit(2)
