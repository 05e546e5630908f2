"""Starting or attaching to Ray for one command (run, evaluate). Light: imports ray only, so
commands that need no model (evaluate) do not load torch in the driver or the workers."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import ray
from ray.data import DataContext

MIN_RAY = (2, 51)


def _check_version() -> None:
    parts = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if parts < MIN_RAY:
        raise RuntimeError(f"zsad needs Ray >= {'.'.join(map(str, MIN_RAY))}, found {ray.__version__}")


@contextlib.contextmanager
def ray_session(address: str | None, log: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Start a local Ray for the run (address None) and shut it down after, or attach to a cluster.

    Yields information about the session (address, resources). A Ray that this process had
    already initialised is reused and left running.
    """
    _check_version()
    if ray.is_initialized():
        yield {"address": "existing", "resources": ray.cluster_resources(), "local": False}
        return
    if address:
        log(f"attaching to Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        log("starting a local Ray instance for this run")
        ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    try:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        yield {"address": address or "local", "resources": ray.cluster_resources(), "local": address is None}
    finally:
        ray.shutdown()


def root_cause(exc: BaseException) -> str:
    """A one-line cause for an exception that came back through Ray (task or actor errors)."""
    cause: BaseException = exc
    seen = set()
    while id(cause) not in seen:
        seen.add(id(cause))
        nxt = getattr(cause, "cause", None) or cause.__cause__
        if nxt is None or nxt is cause:
            break
        cause = nxt
    text = str(cause).strip().splitlines()
    tail = [line for line in text if line.strip()][-1:] if text else []
    return f"{type(cause).__name__}: {tail[0] if tail else cause!r}"
