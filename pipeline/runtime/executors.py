"""Which executor runs a job's plan: ``ray`` (Ray Data, :mod:`pipeline.runtime.ray_plan`; a local
Ray started for the command or a cluster at ``--address``) or ``local`` (this process, no Ray,
:mod:`pipeline.runtime.local_plan`). The choice is ``runtime.executor`` of the spec (``zsad run
--executor``); the run, the few-shot bank pass, the mutual-scoring pool pass and the evaluation all
go through :func:`plan_session` and :func:`execute`, so the code around the plan is one code."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pyarrow as pa

EXECUTORS = ("ray", "local")


class ExecutorError(ValueError):
    """An executor setting that cannot work (an unknown name, ``--address`` with ``local``)."""


def check(executor: str, address: str | None) -> None:
    if executor not in EXECUTORS:
        raise ExecutorError(f"executor {executor!r}: use {' or '.join(EXECUTORS)}")
    if executor == "local" and address:
        raise ExecutorError(f"runtime.executor is local (this process, no Ray): --address {address} needs the ray "
                            "executor (drop --address, or use --executor ray)")


@contextlib.contextmanager
def plan_session(executor: str, address: str | None, log: Callable[[str], None], spec: Any = None) -> Iterator[dict[str, Any]]:
    """The session a command's plans run in: a Ray session (started or attached; shut down after when
    started here) or the in-process one. Yields ``{"executor", "address", "resources", "local"}``.
    The caller has checked the pair with :func:`check` (run_job does, before anything is written)."""
    if executor == "local":
        from pipeline.runtime.local_plan import local_session

        with local_session(spec, log) as session:
            yield session
        return
    from pipeline.runtime.session import ray_session

    with ray_session(address, log) as session:
        yield {**session, "executor": "ray"}


def execute(spec: Any, plan: list, inputs: pa.Table, columns: list[str], session: dict[str, Any],
            log: Callable[[str], None], **kwargs: Any) -> Iterator[pa.Table]:
    """Run ``plan`` over ``inputs`` with the session's executor; Arrow result batches in input order."""
    if session.get("executor") == "local":
        from pipeline.runtime.local_plan import run_plan_local

        return run_plan_local(spec, plan, inputs, columns, session, log, **kwargs)
    from pipeline.runtime.ray_plan import run_plan

    return run_plan(spec, plan, inputs, columns, session, log, **kwargs)
