"""The Ray side of a run: the declared plan (:func:`pipeline.stages.plan.build_plan`) as a Ray Data
dataset, streamed back to the driver.

This module is the only place that calls ``map_batches`` for a run's plan: one call per planned
stage, a task stage as Ray tasks, an actor stage as an actor pool (``ActorPoolStrategy``) whose
actors build their models once. (The evaluation pass over written tables, ``zsad evaluate``, is a
separate one-stage dataset in :mod:`pipeline.runtime.evaluate`.) Minimum Ray version: 2.51
(``compute=ActorPoolStrategy`` with ``min_size``/``max_size``, named resource arguments).

Resources come from ``resources.<stage>`` of the spec. A task stage never asks for a GPU. An
actor stage asks for ``num_gpus`` except on a local Ray without GPUs, where it runs on the CPU and
says so. On a local Ray, a request that no node can satisfy fails at once, naming the stage and the
resources, instead of waiting forever; on a cluster the request is kept, so an autoscaler can add
nodes. The image and float-map columns are dropped before results come back: only the columns the
output tables read reach the driver.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from pipeline.config import JobSpec
from pipeline.runtime.udf import ActorStage, TaskStage
from pipeline.stages.base import PlannedStage
from pipeline.stages.plan import PlanError


def effective_gpus(spec: JobSpec, session: dict[str, Any], log: Callable[[str], None], stage: str = "clip_score",
                   asked: float | None = None) -> float:
    """GPUs for a model pool (``asked``, default ``resources.<stage>.num_gpus``): as the spec asks,
    except on a local session without GPUs (a local Ray, where asking for one would wait forever, or
    the in-process executor): there it falls back to CPU and says so, naming the session
    (``session["where"]``). On a cluster the request is kept (an autoscaler may add GPU nodes)."""
    if asked is None:
        asked = getattr(spec.resources, stage).num_gpus
    if asked and session["local"] and not session["resources"].get("GPU"):
        where = session.get("where", "this machine's Ray")
        log(f"{stage}: {asked} GPU asked but {where} has no GPU: running {stage} on CPU")
        return 0.0
    return asked


def stage_request(planned: PlannedStage, spec: JobSpec, session: dict[str, Any],
                  log: Callable[[str], None]) -> dict[str, float]:
    """What one task or one actor of ``planned`` asks Ray for: ``CPU``, ``GPU``, ``memory``."""
    res = planned.resources
    request: dict[str, float] = {"CPU": res.num_cpus}
    if planned.kind == "actor":
        gpus = effective_gpus(spec, session, log, planned.name, res.num_gpus)
        if gpus:
            request["GPU"] = gpus
    elif res.num_gpus:
        log(f"resources.{planned.name}.num_gpus={res.num_gpus} is not used: {planned.name} runs as CPU tasks")
    if res.memory:
        request["memory"] = float(res.memory)
    return request


def check_feasible(requests: Iterable[tuple[PlannedStage, dict[str, float]]], available: dict[str, float]) -> None:
    """On a local Ray: fail at once when a stage asks for more than this machine has (one task or
    actor, or an actor pool's ``min_actors`` together), instead of waiting forever."""
    pools: dict[str, float] = {}
    for planned, request in requests:
        count = planned.resources.min_actors if planned.kind == "actor" else 1
        for resource, amount in request.items():
            need = amount * count
            if need > available.get(resource, 0.0) + 1e-9:
                what = f"{count} actors x {request}" if count > 1 else f"{request} per {planned.kind}"
                raise PlanError(
                    f"stage {planned.name!r} asks for {what}, but this machine's Ray has "
                    f"{ {k: v for k, v in available.items() if k in ('CPU', 'GPU', 'memory')} }: it could never run. "
                    f"Lower resources.{planned.name} in the job spec, or run on a cluster (--address)"
                )
            if planned.kind == "actor":
                pools[resource] = pools.get(resource, 0.0) + need
    for resource, need in pools.items():
        if need > available.get(resource, 0.0) + 1e-9:
            raise PlanError(
                f"the actor pools ({', '.join(p.name for p, _ in requests if p.kind == 'actor')}) "
                f"need {need:g} {resource} "
                f"at their minimum size together, but this machine's Ray has {available.get(resource, 0.0):g}: "
                "lower their resources or min_actors"
            )


def cpu_contention(requests: list[tuple[PlannedStage, dict[str, float]]], available: dict[str, float]) -> str | None:
    """On a local Ray: a line of advice when the actor pools at their minimum size hold so many CPUs
    that a task stage after the first pool cannot run beside them (a task before it is fused into
    the pool's actors by Ray Data). That stage then waits until a pool has taken its whole input:
    fine for a few images, a stall of the stream on a large input."""
    cpus = available.get("CPU", 0.0)
    held = sum(r.get("CPU", 0.0) * p.resources.min_actors for p, r in requests if p.kind == "actor")
    seen_actor, starved = False, []
    for planned, request in requests:
        if planned.kind == "actor":
            seen_actor = True
        elif seen_actor and held + request.get("CPU", 0.0) > cpus + 1e-9:
            starved.append(planned.name)
    if not starved:
        return None
    pools = ", ".join(f"resources.{p.name}.num_cpus" for p, _ in requests if p.kind == "actor")
    return (f"the actor pools hold {held:g} of this machine's {cpus:g} CPUs, so {', '.join(starved)} "
            f"can only run when a "
            f"pool has finished its input; on a large input give the pools CPU fractions ({pools}, e.g. 0.5) "
            f"or run on a cluster")


def _remote_args(request: dict[str, float]) -> dict[str, Any]:
    args: dict[str, Any] = {"num_cpus": request["CPU"]}
    if "GPU" in request:
        args["num_gpus"] = request["GPU"]
    if "memory" in request:
        args["memory"] = request["memory"]
    return args


def run_plan(
    spec: JobSpec,
    plan: list[PlannedStage],
    inputs: pa.Table,
    columns: list[str],
    session: dict[str, Any],
    log: Callable[[str], None],
    result_batch_rows: int | None = None,
    on_stats: Callable[[str], None] | None = None,
) -> Iterator[pa.Table]:
    """Execute ``plan`` over the input rows ``inputs`` (the input manifest as Arrow) and yield Arrow
    result batches with ``columns`` as they complete (block by block by default, so progress is
    timely). When the plan is exhausted, ``on_stats`` receives Ray Data's execution statistics."""
    requests = [(p, stage_request(p, spec, session, log)) for p in plan]
    if session["local"]:
        check_feasible(requests, dict(session["resources"]))
        advice = cpu_contention(requests, dict(session["resources"]))
        if advice:
            log(f"note: {advice}")
    # results come back in input order, so shards complete one after another and the driver
    # buffers at most the shards in flight
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    block_rows = max(1, plan[0].resources.batch_size) if plan else max(1, inputs.num_rows)
    blocks = [inputs.slice(i, block_rows) for i in range(0, inputs.num_rows, block_rows)]
    ds = ray.data.from_arrow(blocks)
    for planned, request in requests:
        res = planned.resources
        if planned.kind == "actor":
            ds = ds.map_batches(
                ActorStage,
                fn_constructor_kwargs={"stage": planned.stage, "inputs": dict(planned.inputs),
                                       "use_gpu": "GPU" in request},
                compute=ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
                batch_size=res.batch_size, batch_format="pyarrow", **_remote_args(request),
            )
        else:
            ds = ds.map_batches(TaskStage(planned.stage), batch_size=res.batch_size, batch_format="pyarrow",
                                **_remote_args(request))
    ds = ds.select_columns(columns)
    yield from ds.iter_batches(batch_size=result_batch_rows, batch_format="pyarrow")
    if on_stats is not None:
        try:
            on_stats(ds.stats())
        except Exception as exc:  # stats are diagnostics: never fail a finished run over them
            log(f"could not collect Ray Data stats: {exc}")


def training_dataset(spec, inputs: pa.Table, storage: Any) -> "ray.data.Dataset":
    """``zsad train``'s data: the labelled input rows through the decode stage and the training-sample
    stage (:class:`pipeline.stages.train_prep.TrainPrepStage`: the image at the adapters' size and
    its mask), as CPU tasks with ``resources.decode``. Failed rows stay in (with their error) so the
    workers can count them."""
    from pipeline.stages.decode import DecodeStage
    from pipeline.stages.train_prep import TrainPrepStage

    res = spec.resources.decode
    args = _remote_args({"CPU": res.num_cpus, **({"memory": res.memory} if getattr(res, "memory", None) else {})})
    ds = ray.data.from_arrow(inputs)
    ds = ds.map_batches(TaskStage(DecodeStage.from_spec(spec, storage, on_cpu=True)), batch_size=res.batch_size,
                        batch_format="pyarrow", **args)
    prep = TrainPrepStage(spec.adapters.image_size, spec.clip.resize, storage)
    ds = ds.map_batches(TaskStage(prep), batch_size=res.batch_size, batch_format="pyarrow", **args)
    return ds.select_columns(["image_id", "category", "pixels", "mask", "status", "error_stage", "error_type",
                              "error_message"])
