"""The in-process executor: the declared plan (:func:`pipeline.stages.plan.build_plan`) run in the
calling process, without Ray (``runtime.executor: local``, ``zsad run --executor local``).

It runs exactly what :mod:`pipeline.runtime.ray_plan` hands to Ray Data: the same stage objects
(each one goes through a pickle round trip first, as Ray ships it to a worker, so the driver's
planned stages stay untouched), the same :mod:`pipeline.runtime.udf` wrappers (numpy view in,
typed Arrow block out), the input rows sliced into blocks of the first stage's batch size, and
each stage fed batches of its own ``resources.<stage>.batch_size``. An actor stage is set up once
(its models built once); a task stage is called batch by batch. The stages run one after another
on one stream, in input order, so the driver holds one batch per stage at a time.

What it does not do: parallelism (one process, one stage at a time), actor pools, resource
requests, retries of a lost worker. ``resources.<stage>`` sizes the batches and nothing else;
``num_gpus`` asks for this process's GPU (CUDA) when it has one, else the stage runs on the CPU
and says so (:func:`pipeline.runtime.ray_plan.stage_request`, the rule of the Ray executor).
Everything after the plan (shards, sinks, markers, passes, records, reports) is the caller's and is
the same code for both executors.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from pipeline.config import JobSpec
from pipeline.stages.base import PlannedStage


def _gpu_count() -> int:
    """CUDA devices this process sees (torch is imported only when a stage asks for a GPU)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def local_session(spec: JobSpec | None, log: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """The in-process executor's session: what this process has (CPUs, GPUs), no Ray."""
    resources = {"CPU": float(os.cpu_count() or 1), "GPU": float(_gpu_count()) if _asks_gpu(spec) else 0.0}
    log("running the plan in this process (executor local: no Ray, stages one after another)")
    yield {"executor": "local", "address": None, "resources": resources, "local": True, "where": "this process"}


def _asks_gpu(spec: JobSpec | None) -> bool:
    if spec is None:
        return False
    return any(float(r.get("num_gpus") or 0) > 0 for r in spec.resources.model_dump().values())


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Blocks -> one block, as Ray Data joins them (tensor columns of other shapes included)."""
    if len(tables) == 1:
        return tables[0]
    from ray.data._internal.arrow_ops.transform_pyarrow import concat

    return concat(tables, preserve_order=True)


def rebatch(blocks: Iterable[pa.Table], size: int | None) -> Iterator[pa.Table]:
    """Blocks -> batches of exactly ``size`` rows (the last one shorter), in order; ``size`` None
    passes the blocks through as they are."""
    if not size:
        yield from (b for b in blocks if b.num_rows)
        return
    held: list[pa.Table] = []
    n = 0
    for block in blocks:
        while block.num_rows:
            take = min(size - n, block.num_rows)
            held.append(block.slice(0, take))
            block = block.slice(take)
            n += take
            if n == size:
                yield _concat(held)
                held, n = [], 0
    if n:
        yield _concat(held)


class _Timed:
    """One stage's wrapper with its counters (for the executor's stats)."""

    def __init__(self, name: str, kind: str, wrapper: Any, setup_s: float) -> None:
        self.name, self.kind, self.wrapper, self.setup_s = name, kind, wrapper, setup_s
        self.batches = self.rows = 0
        self.seconds = 0.0

    def run(self, batches: Iterable[pa.Table]) -> Iterator[pa.Table]:
        for batch in batches:
            t0 = time.perf_counter()
            out = self.wrapper(batch)
            self.seconds += time.perf_counter() - t0
            self.batches += 1
            self.rows += batch.num_rows
            yield out

    def line(self) -> str:
        setup = f", set up in {self.setup_s:.2f} s" if self.kind == "actor" else ""
        return f"{self.name} ({self.kind}): {self.rows} rows in {self.batches} batches, {self.seconds:.2f} s{setup}"


def as_shipped(stage: Any) -> Any:
    """The stage as a worker receives it: a round trip through Ray's cloudpickle (what Ray ships to
    every task and actor), so setting it up never changes the driver's planned stage."""
    from ray import cloudpickle

    return pickle.loads(cloudpickle.dumps(stage))


def run_plan_local(
    spec: JobSpec,
    plan: list[PlannedStage],
    inputs: pa.Table,
    columns: list[str],
    session: dict[str, Any],
    log: Callable[[str], None],
    result_batch_rows: int | None = None,
    on_stats: Callable[[str], None] | None = None,
) -> Iterator[pa.Table]:
    """Execute ``plan`` over ``inputs`` in this process and yield Arrow result batches with
    ``columns``, in input order (the same contract as :func:`pipeline.runtime.ray_plan.run_plan`).
    When the plan is exhausted, ``on_stats`` receives a few lines of statistics per stage."""
    from pipeline.runtime.ray_plan import stage_request
    from pipeline.runtime.udf import ActorStage, TaskStage

    t_start = time.perf_counter()
    steps: list[_Timed] = []
    for planned in plan:
        stage = as_shipped(planned.stage)
        request = stage_request(planned, spec, session, log)  # the GPU rule and its messages, as on Ray
        if planned.kind == "actor":
            t0 = time.perf_counter()
            wrapper = ActorStage(stage, planned.inputs, "GPU" in request)  # sets the stage up (builds its models) once
            steps.append(_Timed(planned.name, "actor", wrapper, time.perf_counter() - t0))
        else:
            steps.append(_Timed(planned.name, "task", TaskStage(stage), 0.0))
    block_rows = max(1, plan[0].resources.batch_size) if plan else max(1, inputs.num_rows)
    stream: Iterable[pa.Table] = (inputs.slice(i, block_rows) for i in range(0, inputs.num_rows, block_rows))
    for planned, step in zip(plan, steps):
        stream = step.run(rebatch(stream, planned.resources.batch_size))
    for batch in rebatch(stream, result_batch_rows):
        yield batch.select(columns)
    if on_stats is not None:
        lines = [f"executor local: {inputs.num_rows} rows through {len(steps)} stages in this process, "
                 f"{time.perf_counter() - t_start:.2f} s"]
        on_stats("\n".join([*lines, *(f"  {s.line()}" for s in steps)]) + "\n")
