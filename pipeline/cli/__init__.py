"""The ``zsad`` command line (typer).

:mod:`pipeline.cli.core` holds the typer app and what the commands share (console, error lines,
shared options, summary); the commands live in modules by topic, each importing only from
:mod:`pipeline.cli.core` and the rest of :mod:`pipeline`: :mod:`~pipeline.cli.run` (run, resume,
validate, schema, demo), :mod:`~pipeline.cli.train`, :mod:`~pipeline.cli.evaluate` (evaluate, runs),
:mod:`~pipeline.cli.jobs` (Ray Jobs: submit, status, logs, stop) and :mod:`~pipeline.cli.report`
(report, export-maps, compare). Importing them here registers them on :data:`app`, in the order
``zsad --help`` lists them.

Exit codes: 0 success; 1 the run completed but failed (error budget exceeded, a stage failed);
2 bad usage or input (invalid spec, empty or unreachable input, output not writable).
"""

# isort: off
# the order of these imports is the order of `zsad --help`
from pipeline.cli import run, train, evaluate, jobs, report  # noqa: F401 - registers the commands
# isort: on
from pipeline.cli.core import app, main

__all__ = ["app", "main"]
