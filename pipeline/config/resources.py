"""How the stages use the hardware: the ``resources``, ``retries`` and ``runtime`` sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import SpecModel


class StageResources(SpecModel):
    """Resources of one pipeline stage. CPU stages run as Ray tasks; model stages as an actor pool of
    ``min_actors``..``max_actors`` actors. ``num_gpus`` may be fractional. ``memory`` in bytes is a
    scheduling reservation (Ray's ``memory`` resource), not a hard limit."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    memory: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _pool(self) -> "StageResources":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) is below min_actors ({self.min_actors})")
        return self


class RetrySpec(SpecModel):
    """Retries of transient failures (connection reset, timeout, throttling, HTTP 429/5xx; see
    :func:`pipeline.io.retry.is_transient`). ``read``: extra attempts to fetch one image's bytes before
    the row becomes an error row. ``model_load``: extra attempts to fetch and load a model in a model
    actor before the stage (and the run) fails. Waits start at ``backoff_s`` and double, capped at
    ``max_backoff_s``. Permanent errors (missing file, access denied, sha256 mismatch, bad
    checkpoint) are never retried. Lost nodes and crashed workers are retried by Ray itself."""

    read: int = Field(default=3, ge=0)
    model_load: int = Field(default=3, ge=0)
    backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)


class ResourcesSpec(SpecModel):
    """One section per pipeline stage (``resources.<stage>``), each a :class:`StageResources`.
    Task stages (decode, tiling, aggregate, encode; foreground without SAM) run as CPU tasks and
    never ask for GPUs; actor stages (clip_score; foreground with SAM) use ``num_gpus`` and the pool
    size."""

    decode: StageResources = StageResources(num_cpus=1, batch_size=32)
    foreground: StageResources = StageResources(num_cpus=1, batch_size=4)
    sam_refine: StageResources = StageResources(num_cpus=1, batch_size=4)
    tiling: StageResources = StageResources(num_cpus=1, batch_size=32)
    clip_score: StageResources = StageResources(num_cpus=1, batch_size=16)
    aggregate: StageResources = StageResources(num_cpus=1, batch_size=32)
    encode: StageResources = StageResources(num_cpus=1, batch_size=32)


class RuntimeSpec(SpecModel):
    """How the model stages share the hardware. ``fuse_models: true`` runs every model stage
    (SAM foreground, CLIP scoring, SAM refinement, and the CPU stages between them) in ONE actor
    pool, with ``resources.clip_score``'s pool size and batch size and the largest ``num_gpus`` /
    ``num_cpus`` of the fused stages: one copy of each model per GPU and no hand-over between pools,
    for small clusters (one or two GPUs) where separate pools would sit idle waiting for each other.
    The default (``false``) keeps one pool per model stage, sharing GPUs by the fractions of
    ``resources.<stage>.num_gpus`` (README "GPU execution").

    ``executor``: what runs the plan. ``ray`` (the default) streams it through Ray Data: a local Ray
    started for the command, or the cluster at ``--address``; actor pools, parallel stages, GPUs
    by request, workers on other nodes. ``local`` runs the same stages, batch by batch, in the
    command's own process without starting Ray: seconds instead of a Ray start, for a quick look at
    a few images, debugging a stage, or tests; one stage at a time, no pools, one machine.
    ``zsad run --executor`` sets it; it never changes the results, so a run may be resumed with the
    other executor."""

    fuse_models: bool = False
    executor: Literal["ray", "local"] = "ray"
