"""The base of zsad's own errors.

Every error zsad raises for a user to read (bad input, a failed run, a model that cannot be loaded)
derives from :class:`ZsadError`: its message names the input or step and the problem, and
``exit_code`` is what the CLI exits with (1: the work failed; 2: the job spec, an option or an input
is wrong, found before anything ran). Errors that Python or a library already classifies keep that
class as a second base (``ValueError``, ``OSError``, ``RuntimeError``) so callers that catch those
still do.
"""

from __future__ import annotations


class ZsadError(Exception):
    """A failure zsad explains to its user; ``exit_code`` for the CLI."""

    exit_code: int = 1

    def __init__(self, message: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
