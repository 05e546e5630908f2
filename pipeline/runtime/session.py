"""Starting or attaching to Ray for one command (run, evaluate). Light: imports ray only, so
commands that need no model (evaluate) do not load torch in the driver or the workers."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Callable, Iterator

import ray
from ray.data import DataContext

MIN_RAY = (2, 51)


def _check_version() -> None:
    parts = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if parts < MIN_RAY:
        raise RuntimeError(f"zsad needs Ray >= {'.'.join(map(str, MIN_RAY))}, found {ray.__version__}")


def local_resources() -> dict[str, float]:
    """The CPUs and GPUs a local Ray started by :func:`ray_session` will have, counted as Ray counts
    them (its CPU count, which follows cgroup limits and CPU affinity; its GPU count, which follows
    ``CUDA_VISIBLE_DEVICES``), without starting it: so a request this machine can never satisfy is
    refused before Ray starts. The checks run again on the started session's own resources."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    out = {"CPU": float(get_num_cpus())}
    try:
        manager = get_accelerator_manager_for_resource("GPU")
        gpus = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
        out["GPU"] = float(min(gpus, len(visible)) if visible is not None else gpus)
    except Exception:  # noqa: BLE001 - no usable GPU probe: the started session's count decides
        out["GPU"] = 0.0
    return out


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A ``HOST:PORT`` address where nothing answers fails at once with ``ConnectionError``
    (``ray.init`` retries such an address for minutes, silently)."""
    m = re.fullmatch(r"([\w.\-]+):(\d+)", address)
    if not m:
        return  # ray://, auto and the like: Ray's own resolution
    import socket

    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc.strerror or exc}): is the cluster's head running, "
                              "and is that its GCS port (ray start --head --port)?") from None


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
        _check_reachable(address)
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


#: error classes that mean "these weights cannot be used": a run that fails with one exits 2
LOAD_ERRORS = ("ModelLoadError", "SamLoadError", "ClipSegLoadError", "DisLoadError", "WeightsError", "AdapterLoadError")
#: error classes that mean "the spec does not fit its models" (a setting the driver's checks could not
#: see, e.g. adapters at a URI): exit 2 too, and resuming the same spec cannot help
CONFIG_ERRORS = ("SpecError", "UnsupportedModel")
# the line a Python traceback ends with: "[module.]TypeName: message"
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")


def failure(exc: BaseException) -> tuple[str, str]:
    """(error type, one line) for an exception that came back through Ray (task or actor errors).

    Ray wraps a worker's error (an actor that could not start: ``ActorDiedError`` caused by an empty
    ``SystemException``) with the worker's traceback in its message; the deepest exception with a
    message is used, and of its text the last ``Type: message`` line."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and all(cause is not c for c in chain):
        chain.append(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__
    for e in reversed(chain):
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if not lines:
            continue
        for line in reversed(lines):
            m = _ERROR_LINE.match(line)
            if m:
                return m.group(1), m.group(2) or ""
        return type(e).__name__, lines[-1]
    return type(exc).__name__, repr(exc)


def root_cause(exc: BaseException) -> str:
    """A one-line cause for an exception that came back through Ray: ``Type: message``."""
    kind, text = failure(exc)
    return f"{kind}: {text}"
