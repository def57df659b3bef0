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
    from typer.exceptions import TyperException

    from moekit.errors import MoekitError, explain

    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Abort:  # Ctrl-C: the writers already left every output whole
        print("moekit: interrupted", file=sys.stderr)
        sys.exit(130)
    except TyperException as e:  # the parser's own: an unknown option, a missing one, "abc" where a number goes
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            sys.exit(0)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"moekit: error: {e.format_message()}{where}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2) or 2)
    except MoekitError as e:
        print(f"moekit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a full disk, a read-only folder, CUDA memory: one line; anything else is a bug
        line = explain(e)
        if line is None:
            raise
        print(f"moekit: error: {line}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
