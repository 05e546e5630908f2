"""Which executor runs a job's plan: ``ray`` (Ray Data, :mod:`pipeline.runtime.ray_plan`; a local
Ray started for the command or a cluster at ``--address``) or ``local`` (this process, no Ray,
:mod:`pipeline.runtime.local_plan`). The choice is ``runtime.executor`` of the spec (``zsad run
--executor``); the run, the few-shot bank pass, the mutual-scoring pool pass and the evaluation all
go through :func:`plan_session` and :func:`execute`, so the code around the plan is one code."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pyarrow as pa

from pipeline.errors import ZsadError

EXECUTORS = ("ray", "local")


class ExecutorError(ZsadError, ValueError):
    """An executor setting that cannot work (an unknown name, ``--address`` with ``local``)."""

    exit_code = 2


def check(executor: str, address: str | None) -> None:
    if executor not in EXECUTORS:
        raise ExecutorError(f"executor {executor!r}: use {' or '.join(EXECUTORS)}")
    if executor == "local" and address:
        raise ExecutorError(f"runtime.executor is local (this process, no Ray): --address {address} needs the ray "
                            "executor (drop --address, or use --executor ray)")


@contextlib.contextmanager
def plan_session(executor: str, address: str | None, log: Callable[[str], None],
                 spec: Any = None) -> Iterator[dict[str, Any]]:
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


def run_tasks(fn: Callable[..., Any], calls: list[dict[str, Any]], session: dict[str, Any], log: Callable[[str], None],
              what: str, num_cpus: float = 1.0, on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """Run ``fn(**call)`` for every call: as Ray tasks of ``num_cpus`` each in a Ray session (as many
    at once as the cluster places), one after another in this process with the local executor. The
    results (small: counts and names, never tensors) come back in completion order; ``on_result``
    sees each as it arrives. A task that fails raises its error here."""
    if not calls:
        return []
    if session.get("executor") == "local":
        out = []
        for call in calls:
            out.append(fn(**call))
            if on_result is not None:
                on_result(out[-1])
        return out
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=2, retry_exceptions=False)(fn)
    pending = [remote.remote(**call) for call in calls]
    log(f"{what}: {len(pending)} Ray task(s) of {num_cpus:g} CPU")
    out = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=60.0)
        if not done:
            log(f"{what}: waiting for {len(pending)} task(s) ({len(out)} done; the cluster has "
                f"{ray.available_resources().get('CPU', 0):g} CPU free)")
            continue
        out.append(ray.get(done[0]))
        if on_result is not None:
            on_result(out[-1])
    return out
