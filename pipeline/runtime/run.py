"""One run from start to finish: list -> inputs.parquet -> the checked plan -> Ray -> every
output table, shard by shard -> run.json.

``run.json`` (the *run record*) is written LAST and only then does the run count as complete; its
``status`` is ``succeeded`` or ``failed`` (error budget exceeded, or the plan itself failed, with
the cause). The parts live beside this module: the Ray plan in :mod:`ray_plan`, incremental runs in
:mod:`incremental`, the stall watchdog in :mod:`watchdog`; the tables are projections of the plan's
rows (:mod:`pipeline.io.projection`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.config import DataSpec, JobSpec
from pipeline.errors import ZsadError
from pipeline.io import contracts, projection
from pipeline.io import fs as fsio
from pipeline.io.layouts import InputError, list_inputs
from pipeline.io.lease import Lease, LeaseHeld
from pipeline.io.manifest import read_manifest, write_manifest
from pipeline.io.sinks import ShardSink, read_json, write_json
from pipeline.runtime import fewshot, mutual
from pipeline.runtime.ids import check_run_id, new_run_id
from pipeline.runtime.incremental import unscored
from pipeline.runtime.passes import CategoryPass, PassError, RunContext
from pipeline.runtime.preflight import spec_problem
from pipeline.runtime.progress import Progress, ShardTally, busy_seconds, timed_stages
from pipeline.runtime.record import (
    plan_entries,
    run_record,
    run_values,
    versions,  # noqa: F401 - by its old name
)
from pipeline.runtime.rows import SOURCE_COLUMNS, source_rows  # noqa: F401 - source_rows: the plan's first rows, by name
from pipeline.runtime.watchdog import watched
from pipeline.stages.base import PlannedStage
from pipeline.stages.plan import PlanError, build_plan, check_columns, column_defaults, with_inputs


class RunError(ZsadError, RuntimeError):
    """A run that cannot start or did not complete; the message says why (CLI exit code 1 or 2)."""


@dataclass
class RunResult:
    run_id: str
    run_dir: str
    status: str
    n_images: int
    n_ok: int
    n_failed: int
    record: dict[str, Any] = field(default_factory=dict)  # the run record (run.json)
    exit_code: int = 0  # 0 succeeded, 1 failed, 2 failed because a model's weights cannot be used
    already: bool = False  # a resume found the run succeeded: nothing was run or written

    @property
    def error_rate(self) -> float:
        return self.n_failed / self.n_images if self.n_images else 0.0



def skipped_text(skipped: dict[str, int]) -> str:
    """``{"extension": 2, "hidden": 1}`` -> a line for the log and the summary, with the hint."""
    parts = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    hint = " (image endings are data.extensions)" if skipped.get("extension") else ""
    return f"{sum(skipped.values())} files ({parts}){hint}"


def output_tables(spec: JobSpec) -> list[str]:
    """The tables a run of ``spec`` writes, besides inputs.parquet: the shard tables whose contract's
    ``shards.when`` key the spec sets (schemas/README.md)."""
    return contracts.written_tables(spec)


#: the passes over whole categories, in the order they run (each says whether a job has it)
PASSES: tuple[type[CategoryPass], ...] = (fewshot.BanksPass, mutual.PoolsPass, mutual.RscinPass,
                                          fewshot.TransductivePass)


def passes_for(spec: JobSpec) -> list[CategoryPass]:
    return [cls(spec) for cls in PASSES if cls.applies(spec)]


def plan_for(spec: JobSpec, storage, tables: list[str]) -> tuple[list[PlannedStage], list[str]]:
    """The checked plan of ``spec`` and the columns its results must bring back for ``tables``
    (and for the shard markers). Raises :class:`RunError` (exit 2) when the plan cannot run."""
    source = SOURCE_COLUMNS
    outputs = {t: projection.needs(contracts.load(t)) for t in tables}
    try:
        plan = build_plan(spec, storage, source=source, outputs=outputs)
    except PlanError as exc:
        raise RunError(f"the job's plan cannot run: {exc}", exit_code=2) from None
    final = check_columns(plan, source)
    wanted = {"image_id", "status", "error_stage"} | {f"{s}_ms" for s in timed_stages()}
    wanted |= {c for p in passes_for(spec) for c in p.result_columns}
    for required, optional in outputs.values():
        wanted |= required | optional
    return plan, sorted(wanted & final)


def with_defaults(batch: pa.Table, defaults: dict[str, tuple[Any, Any]]) -> pa.Table:
    """``batch`` with the columns of the stages the plan does not run (:func:`column_defaults`)."""
    for name, (type_, value) in defaults.items():
        if name not in batch.column_names:
            batch = batch.append_column(pa.field(name, type_), pa.array([value] * batch.num_rows, type_))
    return batch


def shard_tables(rows: pa.Table, tables: list[str], values: dict[str, Any]) -> dict[str, pa.Table]:
    """The rows of one shard -> every output table's rows (one projection each)."""
    return {t: projection.project(rows, contracts.load(t), values) for t in tables}


def _comparable(spec_data: dict[str, Any]) -> dict[str, Any]:
    """A spec as stored in _plan.json, without its storage section: how the data is reached
    (endpoint, credentials, region) does not change results, so a resume may give other settings;
    nor does ``runtime.executor``."""
    out = {k: v for k, v in spec_data.items() if k != "storage"}
    if isinstance(out.get("runtime"), dict):  # the executor runs the same stages: results do not change
        out["runtime"] = {k: v for k, v in out["runtime"].items() if k != "executor"}
    return out


def preflight_spec(spec: JobSpec, storage: fsio.StorageOptions) -> None:
    """Fail fast on the driver, before Ray starts (:func:`pipeline.runtime.preflight.spec_problem`,
    the check ``zsad validate`` and ``zsad submit`` make, with the objects looked up and read)."""
    problem = spec_problem(spec, storage, objects=True)
    if problem:
        raise RunError(problem, exit_code=2)


def prepare(spec: JobSpec,
            layout: str | None) -> tuple[JobSpec, fsio.StorageOptions, list[str], list[PlannedStage], list[str]]:
    """The checks a run makes before it lists anything: (spec with ``layout`` applied, storage
    options, output tables, the checked plan, the columns its results bring back)."""
    storage = fsio.storage_options(spec.storage)
    if layout:
        spec = spec.model_copy(update={"data": DataSpec(**{**spec.data.model_dump(), "layout": layout})})
    preflight_spec(spec, storage)
    tables = output_tables(spec)
    stages, result_columns = plan_for(spec, storage, tables)
    return spec, storage, tables, stages, result_columns


def dry_run(spec: JobSpec, input_uri: str, *, layout: str | None = None) -> dict[str, Any]:
    """What ``run_job`` would do, without scoring or writing anything: the checks it makes first
    (model, weights, the plan's column contracts), the listing, the plan with each stage's
    resources, and the tables. Raises :class:`RunError` as ``run_job`` would."""
    spec, storage, tables, stages, _ = prepare(spec, layout)
    try:
        used_layout, manifest = list_inputs(input_uri, spec.data, storage)
    except InputError as exc:
        raise RunError(str(exc), exit_code=2) from None
    passes = passes_for(spec)
    ctx = RunContext(spec, "", storage, lambda m: None, manifest, used_layout)
    few: dict[str, Any] = {}
    for p in passes:
        try:
            few.update(p.dry_run(ctx))
        except PassError as exc:
            raise RunError(str(exc), exit_code=exc.exit_code) from None
    return {
        "input": input_uri,
        "layout": used_layout,
        "images": len(manifest),
        "images_by_category": {str(k): int(v) for k, v in manifest["category"].value_counts().sort_index().items()},
        "labelled_images": int(manifest["gt_label"].notna().sum()),
        "listing_errors": int(manifest["list_error_type"].notna().sum()),
        "skipped_at_listing": dict(manifest.attrs.get("skipped", {})),
        "shards": -(-len(manifest) // spec.shard_size),
        "plan": plan_entries(spec, stages, passes, resources=True),
        "tables": tables,
        "executor": spec.runtime.executor,
        "random_weights": spec.random_weights,
        **few,
    }


def run_job(
    spec: JobSpec,
    input_uri: str,
    output_uri: str,
    *,
    run_id: str | None = None,
    layout: str | None = None,
    address: str | None = None,
    resume: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    then: Callable[[RunResult], Any] | None = None,
    progress_stream: Any = None,
    log_name: str | None = None,
) -> RunResult:
    """Run ``spec`` over ``input_uri`` and write the tables under ``output_uri/run_id``.

    The steps: open the run (checks, lease), list the input or restore a resumed run's listing,
    the passes before the plan, stream the shards, the passes after it, write the record. The
    passes over whole categories (:data:`PASSES`) run through the same steps whatever they are.

    ``then`` is called with the result after ``run.json`` is written, while the run's Ray session
    is still open (the CLI evaluates there instead of starting a second Ray). ``progress_stream``:
    where a terminal progress bar is drawn (when it is a TTY; else progress goes to ``log``).
    ``log_name``: the command's log file is copied to ``RUN/logs/<log_name>`` when it ends (by the
    caller, :mod:`pipeline.runtime.console`); run.json names it (``log``)."""
    run = _Run(spec, input_uri, output_uri, run_id=run_id, layout=layout, address=address, resume=resume, log=log,
               progress_stream=progress_stream, log_name=log_name)
    already = run.open()
    if already is not None:
        return already
    with contextlib.ExitStack() as held:
        run.held = held
        run.list_or_restore()
        with contextlib.ExitStack() as ray_stack:  # the run's Ray session stays open until ``then`` has run
            run.ray_stack = ray_stack
            run.passes_before_and_stream()
            run.count()
            run.passes_after()
            result = run.write_record()
            if then is not None:
                then(result)  # e.g. the evaluation, in the same Ray session
            return result


class _Run:
    """One run's state between the steps of :func:`run_job`."""

    def __init__(self, spec: JobSpec, input_uri: str, output_uri: str, *, run_id: str | None, layout: str | None,
                 address: str | None, resume: bool, log: Callable[[str], None], progress_stream: Any,
                 log_name: str | None) -> None:
        self.spec, self.input_uri, self.output_uri = spec, input_uri, output_uri
        self.run_id, self.layout, self.address, self.resume = run_id, layout, address, resume
        self.log, self.progress_stream, self.log_name = log, progress_stream, log_name
        self.held: contextlib.ExitStack | None = None
        self.ray_stack: contextlib.ExitStack | None = None
        self.session: dict[str, Any] | None = None
        self.session_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ open the run
    def open(self) -> RunResult | None:
        """The checks before anything is written; a resumed run that already succeeded: its result."""
        from pipeline.runtime.executors import ExecutorError, check

        self.started = dt.datetime.now(dt.timezone.utc)
        self.t_start = time.monotonic()
        self.run_id = self.run_id or new_run_id(self.started)
        problem = check_run_id(self.run_id)
        if problem:
            raise RunError(problem, exit_code=2)
        self.executor = self.spec.runtime.executor
        try:
            check(self.executor, self.address)
        except ExecutorError as exc:
            raise RunError(str(exc), exit_code=2) from None
        self.spec, self.storage, self.tables, self.stages, self.result_columns = prepare(self.spec, self.layout)
        self.passes = passes_for(self.spec)
        self.run_dir = fsio.join(fsio.normalise(self.output_uri), self.run_id)
        self.plan_uri = fsio.join(self.run_dir, "_plan.json")
        try:
            self.finished = fsio.exists(fsio.join(self.run_dir, "run.json"), self.storage)
            self.interrupted = fsio.exists(self.plan_uri, self.storage)
        except Exception as exc:
            raise RunError(f"output {self.output_uri}: cannot be reached: {exc}", exit_code=2) from None
        self.t0 = time.monotonic()
        self.lease = Lease(self.run_dir, self.storage)  # one process works on a run folder at a time
        if self.finished and not self.resume:
            raise RunError(f"run {self.run_dir} already exists (it has a run.json); choose another --run-id",
                           exit_code=2)
        # a run that already succeeded: nothing to do, nothing written (no lease either)
        if self.resume and self.finished:
            record = read_json(fsio.join(self.run_dir, "run.json"), self.storage)
            if record.get("status") == "succeeded":
                if self.interrupted and not self._same_spec(read_json(self.plan_uri, self.storage)):
                    raise RunError(f"run {self.run_dir} was started with a different job spec; resume it with "
                                   f"`zsad resume {self.run_dir}`", exit_code=2)
                counts = record.get("counts", {})
                return RunResult(self.run_id, self.run_dir, "succeeded", int(counts.get("images", 0)),
                                 int(counts.get("ok", 0)), int(counts.get("failed", 0)), record, 0, already=True)
        return None

    def _same_spec(self, plan: dict[str, Any]) -> bool:
        return _comparable(plan["spec"]) == _comparable(self.spec.redacted())

    def take_lease(self) -> None:
        """Before the first write (a refused run writes nothing); released when the run ends."""
        try:
            taken_over = self.lease.acquire(self.run_id, takeover=self.resume, timeout_s=self.spec.lease_timeout_s)
        except LeaseHeld as exc:
            raise RunError(str(exc), exit_code=2) from None
        except Exception as exc:
            raise RunError(f"output {self.run_dir}: cannot be written: {exc}", exit_code=2) from None
        self.held.callback(self.lease.release)
        if taken_over:
            self.log(f"took over the lease of a stopped attempt ({taken_over.get('host')} pid {taken_over.get('pid')}, "
                     f"since {taken_over.get('started')})")

    def context(self) -> RunContext:
        return RunContext(self.spec, self.run_dir, self.storage, self.log, self.manifest, self.used_layout,
                          open_session=self.open_session, files=lambda table: self.sink.files(table))

    def open_session(self) -> dict[str, Any]:
        """The run's session (Ray, or this process), opened on first use and kept until the run ends."""
        from pipeline.runtime.executors import plan_session

        if self.session is None:
            self.session = self.ray_stack.enter_context(plan_session(self.executor, self.address, self.log, self.spec))
            if self.executor == "ray":
                self.session_info = {"address": self.session["address"], "resources": dict(self.session["resources"])}
        return self.session

    # ------------------------------------------------------------------ list or restore
    def list_or_restore(self) -> None:
        spec, storage, log = self.spec, self.storage, self.log
        if self.resume:
            self.take_lease()
            if not self.interrupted:
                raise RunError(f"nothing to resume at {self.run_dir}: no _plan.json (start it without --resume)",
                               exit_code=2)
            plan = read_json(self.plan_uri, storage)  # _plan.json: what the run was started with
            if not self._same_spec(plan):
                raise RunError(f"run {self.run_dir} was started with a different job spec; resume it with "
                               f"`zsad resume {self.run_dir}`", exit_code=2)
            self.input_uri, self.used_layout, self.shard_size = plan["input"], plan["layout"], int(plan["shard_size"])
            self.skipped = dict(plan.get("skipped", {}))
            self.manifest = read_manifest(fsio.join(self.run_dir, "inputs.parquet"), storage)
            ctx = self.context()
            for p in self.passes:
                p.restore(ctx, plan)
        else:
            if self.interrupted:
                self.take_lease()  # a live holder: "in progress"; a gone one: "was interrupted"
                raise RunError(f"run {self.run_dir} was interrupted; continue it with --resume (or `zsad resume "
                               f"{self.run_dir}`)", exit_code=2)
            try:
                self.used_layout, manifest = list_inputs(self.input_uri, spec.data, storage)
            except InputError as exc:
                raise RunError(str(exc), exit_code=2) from None
            self.shard_size = spec.shard_size
            self.skipped = dict(manifest.attrs.get("skipped", {}))
            if self.skipped:
                log(f"left out at listing: {skipped_text(self.skipped)}")
            if spec.skip_scored:
                before = len(manifest)
                manifest = unscored(manifest, spec.skip_scored, storage, exclude=self.run_dir)
                log(f"incremental: {before - len(manifest)} of {before} images already scored ok "
                    f"under {spec.skip_scored}; "
                    f"{len(manifest)} to score")
            self.manifest = manifest
            ctx = self.context()
            for p in self.passes:  # the passes choose their images before anything is written
                try:
                    p.choose(ctx)
                except PassError as exc:
                    raise RunError(str(exc), exit_code=exc.exit_code) from None
            self.take_lease()
            try:
                write_manifest(manifest, fsio.join(self.run_dir, "inputs.parquet"), storage)
                for p in self.passes:
                    p.save(ctx)
                write_json(self.plan_uri, {"run_id": self.run_id, "input": self.input_uri, "layout": self.used_layout,
                                           "shard_size": self.shard_size, "images": len(manifest),
                                           "skipped": self.skipped,
                                           "spec": spec.redacted(), **_merged(p.plan_record() for p in self.passes)},
                           storage)
            except OSError as exc:
                raise RunError(f"output {self.run_dir}: cannot be written: {exc}", exit_code=2) from None
        self.list_s = time.monotonic() - self.t0

    # ------------------------------------------------------------------ passes before, stream the shards
    def passes_before_and_stream(self) -> None:
        from pipeline.runtime.executors import execute
        from pipeline.runtime.session import CONFIG_ERRORS, LOAD_ERRORS, failure

        spec, storage, log, manifest = self.spec, self.storage, self.log, self.manifest
        self.sink = sink = ShardSink(self.run_dir, self.tables, storage)
        shard_of = {iid: i // self.shard_size for i, iid in enumerate(manifest["image_id"])}
        self.expected = expected = pd.Series(list(shard_of.values())).value_counts().to_dict()
        done = sink.markers()
        pending = manifest[[shard_of[i] not in done for i in manifest["image_id"]]].reset_index(drop=True)
        before = [p for p in self.passes if p.when == "before"]
        if before:  # grouped by category: a scoring actor reads each category's bank or pool once
            pending = pending.sort_values("category", kind="stable").reset_index(drop=True)
        log(f"run {self.run_id}: {len(manifest)} images ({self.used_layout} layout) in {len(expected)} shards from "
            f"{self.input_uri} -> {self.run_dir}")
        if self.resume:
            log(f"resuming: {len(done)} shards done, {len(expected) - len(done)} to run ({len(pending)} images)")
        if spec.random_weights:
            log(f"WARNING: random weights for {', '.join(spec.random_models())} (allow_random_weights: true): "
                "scores are NOT meaningful results")
        self.values = values = run_values(spec, self.run_id)
        progress = Progress(len(pending), log, stream=self.progress_stream)
        self.plan_error: str | None = None
        self.unusable_weights = False
        t_plan = time.monotonic()
        self.first_result_s: float | None = None
        self.first_result_rows = 0
        tallies: dict[int, ShardTally] = {}
        self.write_s = 0.0
        try:
            if len(pending):
                session = self.open_session()
                ctx = self.context()
                for p in before:  # the banks and pools, before any image is scored: the scoring stage's inputs
                    p.run(ctx)
                    self.stages = with_inputs(self.stages, p.stage_inputs())

                def save_stats(text: str) -> None:
                    name = "ray_data_stats.txt" if self.executor == "ray" else "local_stats.txt"
                    fs_, path_ = fsio.filesystem(fsio.join(self.run_dir, name), storage)
                    with fs_.open(path_, "w") as fh:
                        fh.write(text)

                defaults = column_defaults(self.stages)  # the columns of stages this plan does not run
                results = execute(spec, self.stages, source_rows(pending), self.result_columns, session, log,
                                  on_stats=save_stats)

                def waiting(quiet: float) -> None:
                    limit = (f"; stall_timeout_s stops the run after {spec.stall_timeout_s:g} s"
                             if spec.stall_timeout_s else "")
                    log(f"waiting for results: none for {quiet:.0f} s ({progress.done}/{progress.total} images done; "
                        f"models loading or a slow batch{limit})")

                # closed as soon as the loop ends, early too: the plan stops with it (the local
                # executor runs it in this process and must not go on scoring after a failure)
                with contextlib.closing(watched(results, spec.stall_timeout_s, on_wait=waiting)) as stream:
                    for batch in stream:
                        batch = with_defaults(batch, defaults)
                        if self.first_result_s is None:
                            self.first_result_s, self.first_result_rows = time.monotonic() - t_plan, batch.num_rows
                        for p in self.passes:
                            p.observe(batch)
                        shards = np.array([shard_of[i] for i in batch.column("image_id").to_pylist()])
                        t_w = time.monotonic()
                        for k in dict.fromkeys(shards.tolist()):
                            part = batch.filter(pa.array(shards == k))
                            sink.append(k, shard_tables(part, sink.tables, values))
                            tally = tallies.setdefault(k, ShardTally())
                            tally.add(part)
                            if tally.images == expected[k]:
                                sink.finish(k, tallies.pop(k).marker())
                                self.lease.heartbeat()
                        self.write_s += time.monotonic() - t_w
                        progress.update(batch.num_rows, sum(s != "ok" for s in batch.column("status").to_pylist()))
        except Exception as exc:  # the plan itself failed (model load, cluster lost): record and report
            error_type, text = failure(exc)
            self.plan_error = f"{error_type}: {text}"
            self.unusable_weights = error_type in LOAD_ERRORS or error_type in CONFIG_ERRORS
            log(f"run failed: {self.plan_error}")
        finally:
            sink.discard()  # unfinished shards: no marker, rerun in full on resume
        self.plan_s = time.monotonic() - t_plan

    # ------------------------------------------------------------------ what the shards say
    def count(self) -> None:
        from pipeline.runtime.session import failure

        sink, manifest, spec = self.sink, self.manifest, self.spec
        self.output_lost = False
        try:
            markers = sink.markers()
        except Exception as exc:  # the output storage went away: what this attempt finished is known
            kind, text = failure(exc)
            self.log(f"cannot read the shard markers at {self.run_dir} ({kind}: {text}); "
                     f"counting the {len(sink.finished)} shards this attempt finished")
            markers = dict(sink.finished)
            self.output_lost = True
        self.markers = markers
        self.busy = busy_seconds(markers)
        n_done = sum(m["images"] for m in markers.values())  # this attempt and earlier ones (resume)
        self.n_failed = sum(m["failed"] for m in markers.values())
        self.failed_by_stage: dict[str, int] = {}
        for m in markers.values():
            for stage_name, count in m.get("failed_by_stage", {}).items():
                self.failed_by_stage[stage_name] = self.failed_by_stage.get(stage_name, 0) + count
        self.n_ok = n_done - self.n_failed
        self.n_missing = len(manifest) - n_done
        self.rate = self.n_failed / len(manifest) if len(manifest) else 0.0
        if self.plan_error:
            self.status, self.reason = "failed", self.plan_error
        elif self.n_missing:
            self.status, self.reason = "failed", f"{self.n_missing} images produced no result row"
        elif self.rate > spec.max_error_rate:
            self.status = "failed"
            self.reason = (f"{self.n_failed} of {len(manifest)} images failed ({100 * self.rate:.1f}%), above "
                           f"max_error_rate {spec.max_error_rate:g}; see {fsio.join(self.run_dir, 'errors')}")
        else:
            self.status, self.reason = "succeeded", None

    # ------------------------------------------------------------------ passes after
    def passes_after(self) -> None:
        """The re-scoring passes, on the workers: they need every image of a category scored."""
        from pipeline.runtime.session import failure

        if self.n_missing or self.output_lost or self.plan_error:
            return
        ctx = self.context()
        for p in self.passes:
            if p.when != "after":
                continue
            try:
                p.run(ctx)
            except Exception as exc:
                kind, text = failure(exc)
                self.status, self.reason = "failed", f"the {p.name} pass could not be written ({kind}: {text})"
                self.log(f"run failed: {self.reason}")
                return

    # ------------------------------------------------------------------ write the record
    def write_record(self) -> RunResult:
        manifest = self.manifest
        ended = dt.datetime.now(dt.timezone.utc)
        sections: dict[str, dict[str, Any]] = {}
        for p in self.passes:
            sections.setdefault(p.section, {}).update(p.record())
        record = run_record(self, ended, sections)
        try:
            write_json(fsio.join(self.run_dir, "run.json"), record, self.storage)
        except Exception as exc:
            from pipeline.runtime.session import failure

            kind, text = failure(exc)
            self.log(f"run.json could not be written to {self.run_dir} ({kind}: {text}); "
                     "the finished shards there are intact")
        if self.status != "succeeded" and self.n_missing and self.unusable_weights:  # the same spec would fail again
            self.log(f"the run stopped on its spec or its weights ({self.plan_error}): fix them and start a new run; "
                     f"a resume would run the same spec again")
        elif self.status != "succeeded" and (self.n_missing
                                             or self.reason and "pass could not be written" in self.reason):
            self.log(f"continue the run with: zsad resume {self.run_dir}")
        exit_code = 0 if self.status == "succeeded" else (2 if self.unusable_weights else 1)
        return RunResult(self.run_id, self.run_dir, self.status, len(manifest), self.n_ok, self.n_failed, record,
                         exit_code)


def _merged(parts) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        out.update(part)
    return out
