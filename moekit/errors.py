"""One exception type for every mistake a user can make.

Its message is a single line that names the problem and the fix; the CLI prints it and exits with
status 2, so bad input never produces a traceback or a half-written output.
"""


class MoekitError(Exception):
    """A user-facing error: one line, the problem and the fix."""
