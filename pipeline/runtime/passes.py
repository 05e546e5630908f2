"""Passes over whole categories: the shape every such pass has (ARCHITECTURE.md "passes over a whole
category"; the instances: few-shot banks and APRIL-GAN's transductive score in
:mod:`pipeline.runtime.fewshot`, MuSc's pools and RsCIN in :mod:`pipeline.runtime.mutual`).

A pass runs ``before`` the streaming plan (it builds what the scoring actors read: banks, pools)
or ``after`` it (it re-scores finished shards). :func:`pipeline.runtime.run.run_job` calls the same
steps of every pass of the job, in order, and knows no pass by name:

1. :meth:`CategoryPass.choose` (a new run, before anything is written): which images, seeded;
   :meth:`save` writes that choice into the run folder once the run holds its lease;
   :meth:`restore` reads it back on resume. Problems here are the user's: :class:`PassError`, exit 2.
2. :meth:`run` in the run's session: build on the workers (digest-checked reuse of what a resumed
   run already has), or re-score on the workers. The driver schedules and counts; features and
   values stay in the run folder.
3. :meth:`stage_inputs`: what the scoring stage needs from the pass (the banks' or pools'
   locations and digests); :meth:`observe` sees each result batch (pool loads per actor).
4. :meth:`record`: the pass's part of run.json (merged into its ``section``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from pipeline.config import JobSpec
from pipeline.errors import ZsadError
from pipeline.io.fs import StorageOptions

Log = Callable[[str], None]


class PassError(ZsadError, RuntimeError):
    """A pass that cannot go on; ``exit_code`` 2 when the job's spec or input is the cause."""


@dataclass
class RunContext:
    """What the passes see of a run: the spec, the run folder, the input manifest (metadata, already
    in the driver), the input's layout, a log, the run's session (opened on first use) and, after
    the plan, the finished shard files."""

    spec: JobSpec
    run_dir: str
    storage: StorageOptions | None
    log: Log
    manifest: pd.DataFrame = field(default_factory=pd.DataFrame)
    layout: str | None = None
    open_session: Callable[[], dict[str, Any]] | None = None
    files: Callable[[str], list[str]] | None = None

    def session(self) -> dict[str, Any]:
        if self.open_session is None:
            raise RuntimeError("this pass needs the run's session")
        return self.open_session()

    def category_sizes(self) -> dict[str, int]:
        """Images per category of the input (rows the listing could not address left out)."""
        m = self.manifest
        usable = m[m["list_error_type"].isna()] if "list_error_type" in m else m
        return {str(k): int(v) for k, v in usable.groupby("category").size().items()}


class CategoryPass:
    """One pass over whole categories. Subclasses set ``name`` (the plan's ``pass``), ``section``
    (run.json), ``when`` (``before`` or ``after``) and implement what they need of the steps."""

    name = "pass"
    section = "pass"
    when = "before"
    #: result columns the pass reads from the streaming plan's batches (:meth:`observe`)
    result_columns: tuple[str, ...] = ()

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    @classmethod
    def applies(cls, spec: JobSpec) -> bool:
        raise NotImplementedError

    def plan_entries(self, resources: bool = False) -> list[dict[str, Any]]:
        return []

    def choose(self, ctx: RunContext) -> None:
        """A new run: choose the pass's images (nothing written yet)."""

    def save(self, ctx: RunContext) -> None:
        """Write the choice into the run folder (the run holds its lease)."""

    def plan_record(self) -> dict[str, Any]:
        """What ``_plan.json`` keeps of the choice, for :meth:`restore`."""
        return {}

    def restore(self, ctx: RunContext, plan: dict[str, Any]) -> None:
        """A resumed run: read the choice back (``plan``: the run's ``_plan.json``)."""

    def dry_run(self, ctx: RunContext) -> dict[str, Any]:
        return {}

    def run(self, ctx: RunContext) -> None:
        """Build (before the plan) or re-score (after it), on the workers."""

    def stage_inputs(self) -> dict[str, Any]:
        """Attributes the scoring stage receives before it is shipped to the workers."""
        return {}

    def observe(self, batch: pa.Table) -> None:
        """A result batch of the streaming plan."""

    def record(self) -> dict[str, Any]:
        return {}
