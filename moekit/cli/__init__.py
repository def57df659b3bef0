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
from . import basic  # noqa: E402,F401
from . import carve  # noqa: E402,F401
from . import densify  # noqa: E402,F401
from . import evaluate  # noqa: E402,F401
from . import merge  # noqa: E402,F401
from . import profile  # noqa: E402,F401
from . import prune  # noqa: E402,F401
from . import route  # noqa: E402,F401
from . import run  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    from ..errors import MoekitError

    try:
        app(args=argv, standalone_mode=True)
    except MoekitError as e:
        print(f"moekit: error: {e}", file=sys.stderr)
        sys.exit(2)
