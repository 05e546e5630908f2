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
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import pipeline
from pipeline.config import DataSpec, JobSpec
from pipeline.io import contracts, projection
from pipeline.io import fs as fsio
from pipeline.io.layouts import InputError, list_inputs
from pipeline.io.lease import Lease, LeaseHeld
from pipeline.io.manifest import read_manifest, write_manifest
from pipeline.io.sinks import ShardSink, read_json, write_json
from pipeline.io.weights import WeightsError, preflight
from pipeline.models import registry
from pipeline.runtime import fewshot, mutual
from pipeline.runtime.ids import check_run_id, new_run_id
from pipeline.runtime.incremental import unscored
from pipeline.runtime.preflight import model_problems, shape_error
from pipeline.runtime.watchdog import watched
from pipeline.stages.fused import find_stage
from pipeline.stages.plan import PlanError, PlannedStage, build_plan, check_columns

#: stages that time their rows (``<stage>_ms``); run.json has ``<stage>_busy`` for each
TIMED_STAGES = ("decode", "foreground", "clip_score", "aggregate", "sam_refine", "encode")


class RunError(RuntimeError):
    """A run that cannot start or did not complete; the message says why (CLI exit code 1 or 2)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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



def _fused_parts(planned: PlannedStage) -> dict[str, Any]:
    """``{"fused": [stage names]}`` for the fused model stage (runtime.fuse_models), else nothing."""
    parts = getattr(planned.stage, "parts", None)
    return {"fused": [p.name for p in parts]} if parts else {}

def _torch_version() -> str:
    """torch's ``__version__`` (with its build label, e.g. ``+cu130``) read from its version file,
    without importing torch in the driver (seconds); the installed distribution's version if that
    file cannot be read."""
    import importlib.metadata
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    try:
        text = open(os.path.join(os.path.dirname(spec.origin), "version.py")).read()  # type: ignore[union-attr]
        return re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", text, re.M).group(1)  # type: ignore[union-attr]
    except (OSError, TypeError, AttributeError):
        return importlib.metadata.version("torch")


def versions() -> dict[str, str]:
    import importlib.metadata

    import pyarrow
    import ray

    # torch and open_clip as installed, without importing them in the driver (seconds)
    return {
        "zsad": pipeline.__version__,
        "python": platform.python_version(),
        "torch": _torch_version(),
        "open_clip": importlib.metadata.version("open_clip_torch"),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "pandas": pd.__version__,
        "numpy": np.__version__,
    }


class Progress:
    """Progress of the run's images: done / total, images/s, failed and the time left (ETA).

    On a terminal (``stream`` is a TTY) one line is redrawn in place with a bar, at most every
    ``bar_interval`` seconds; otherwise (a log file, a pipe, Ray Jobs) a plain line goes to ``log``
    at most every ``interval`` seconds. ``stream=None`` and a ``log`` that drops lines make it quiet."""

    WIDTH = 24

    def __init__(self, total: int, log: Callable[[str], None], interval: float = 2.0, stream: Any = None,
                 bar_interval: float = 0.2) -> None:
        self.total, self.log = total, log
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.stream = stream
        self.interval = bar_interval if self.tty else interval
        self.done = self.failed = 0
        self.t0 = self._last = time.monotonic()

    def text(self, now: float) -> str:
        rate = self.done / max(now - self.t0, 1e-9)
        pct = 100.0 * self.done / max(self.total, 1)
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = "?" if left is None else str(dt.timedelta(seconds=round(left)))
        return f"{self.done}/{self.total} images ({pct:.0f}%), {rate:.1f} images/s, {self.failed} failed, ETA {eta}"

    def update(self, n: int, failed: int) -> None:
        self.done += n
        self.failed += failed
        now = time.monotonic()
        if now - self._last < self.interval and self.done < self.total:
            return
        self._last = now
        if self.tty:
            filled = int(self.WIDTH * self.done / max(self.total, 1))
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            end = "\n" if self.done >= self.total else ""
            self.stream.write(f"\r[{bar}] {self.text(now)}\x1b[K{end}")
            self.stream.flush()
        else:
            self.log(f"progress: {self.text(now)}")


def _pixel_weights(spec: JobSpec) -> str | None:
    """The pixel method's own weights (APRIL-GAN adapters, CLIPSeg): a spec, ``random``, or None."""
    if not hasattr(spec.pixel, "weights"):
        return None
    return spec.pixel.weights.describe() if spec.pixel.weights else "random"


def run_values(spec: JobSpec, run_id: str) -> dict[str, Any]:
    """The run-level values the output tables store in every row (the contracts' ``value:``
    fields): run id, model spec, map range, foreground kind."""
    uses_sam = spec.uses_sam()
    return {
        "run_id": run_id,
        "score_method": spec.score.kind,
        "pixel_method": spec.pixel.kind,
        "prompt_set": spec.score.describe_prompts(),
        "clip_model": spec.clip.model,
        "clip_weights": spec.clip.weights.describe() if spec.clip.weights else "random",
        "random_weights": spec.random_weights,
        "sam_model": spec.sam.model if uses_sam else None,
        "sam_weights": (spec.sam.weights.describe() if spec.sam.weights else "random") if uses_sam else None,
        "map_min": float(spec.map_range()[0]),
        "map_max": float(spec.map_range()[1]),
        "clip_activation": spec.clip.activation,
        "pixel_weights": _pixel_weights(spec),
        "foreground_kind": spec.foreground.kind if spec.foreground else None,
    }


#: run.json's model section: the run values that describe the models
MODEL_KEYS = ("score_method", "pixel_method", "prompt_set", "clip_model", "clip_weights", "clip_activation", "pixel_weights",
              "random_weights", "sam_model", "sam_weights")


def skipped_text(skipped: dict[str, int]) -> str:
    """``{"extension": 2, "hidden": 1}`` -> a line for the log and the summary, with the hint."""
    parts = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    hint = " (image endings are data.extensions)" if skipped.get("extension") else ""
    return f"{sum(skipped.values())} files ({parts}){hint}"


def output_tables(spec: JobSpec) -> list[str]:
    """The tables a run of ``spec`` writes, besides inputs.parquet."""
    tables = ["scores", "errors"]
    if spec.pixel.kind != "none":
        tables.append("masks")
    if spec.foreground is not None:
        tables.append("foreground")
    if spec.tiling is not None and spec.tiling.write_table:
        tables.append("tiles")
    if spec.mutual is not None:
        tables.append("embeddings")
    return tables


#: the columns every row starts with: the input manifest's, and its status (rows the listing could
#: not address start as error rows of stage ``list``)
SOURCE_COLUMNS: tuple[str, ...] = (*contracts.load("inputs").names, "status", "error_stage", "error_type", "error_message")


def source_rows(manifest: pd.DataFrame) -> pa.Table:
    """The input manifest as the plan's first rows (Arrow), with their status columns."""
    table = contracts.to_table(manifest, contracts.load("inputs"))
    failed = pc.is_valid(table.column("list_error_type"))
    nothing = pa.scalar(None, pa.string())
    columns = {
        "status": pc.if_else(failed, "error", "ok"),
        "error_stage": pc.if_else(failed, pa.scalar("list"), nothing),
        "error_type": table.column("list_error_type"),
        "error_message": table.column("list_error_message"),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


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
    wanted = {"image_id", "status", "error_stage"} | {f"{s}_ms" for s in TIMED_STAGES}
    for required, optional in outputs.values():
        wanted |= required | optional
    return plan, sorted(wanted & final)


class ShardTally:
    """What a shard's done marker says: images, failed (total and per stage), busy seconds per stage;
    added up batch by batch as the shard's rows stream through."""

    def __init__(self) -> None:
        self.images = self.failed = self.refined = 0
        self.busy = {s: 0.0 for s in TIMED_STAGES}
        self.failed_by_stage: dict[str, int] = {}

    def add(self, rows: pa.Table) -> None:
        self.images += rows.num_rows
        for status, stage in zip(rows.column("status").to_pylist(), rows.column("error_stage").to_pylist()):
            if status != "ok":
                self.failed += 1
                self.failed_by_stage[str(stage)] = self.failed_by_stage.get(str(stage), 0) + 1
        if "refined" in rows.column_names:
            self.refined += int(pc.sum(rows.column("refined").cast(pa.int64())).as_py() or 0)
        for s in TIMED_STAGES:
            if f"{s}_ms" in rows.column_names:
                self.busy[s] += float(pc.sum(rows.column(f"{s}_ms")).as_py() or 0.0) / 1000.0

    def marker(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "busy": self.busy, "failed_by_stage": self.failed_by_stage,
                "refined": self.refined}


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
    """Fail fast on the driver, before Ray starts: model name, pretrained tag, the settings against the
    model's shape (:mod:`pipeline.runtime.preflight`), weights locations, local files."""
    w = spec.clip.weights
    try:
        registry.check_model(spec.clip.model, w.tag if w is not None else None)
    except registry.ModelLoadError as exc:
        raise RunError(f"clip.weights / clip.model: {exc}", exit_code=2) from None
    problems = model_problems(spec)  # the settings against the model's shape, before any weights are looked up
    if problems:
        raise RunError(shape_error(spec, problems), exit_code=2)
    try:
        preflight(w, storage)
    except WeightsError as exc:
        raise RunError(f"clip.weights / clip.model: {exc}", exit_code=2) from None
    others = {
        "sam.weights": spec.sam.weights if spec.uses_sam() and spec.sam else None,
        "foreground.dis_model": spec.foreground.dis_model if spec.uses_sam() and spec.foreground else None,
        "pixel.weights": getattr(spec.pixel, "weights", None),
    }
    for key, weights in others.items():
        try:
            preflight(weights, storage)
        except WeightsError as exc:
            raise RunError(f"{key}: {exc}", exit_code=2) from None
    from pipeline.stages.clip_score import prompt_file_problem

    problem = prompt_file_problem(spec, storage)
    if problem:
        raise RunError(problem, exit_code=2)
    # local torch checkpoints: read their structure now (tensors mapped, not read), so an unusable file
    # stops the run here with its reason instead of in every model actor (SAM's and the adapters' files:
    # with the model-shape checks above)
    torch_files = {"clip.weights": (spec.clip.weights, "weights file"),
                   "pixel.weights": (spec.pixel.weights if spec.pixel.kind == "clipseg" else None, "CLIPSeg weights file")}
    for key, (weights, what) in torch_files.items():
        if weights is not None and weights.path:
            from pipeline.models.checkpoints import read_state_dict  # torch: only when there is a file to read

            try:
                read_state_dict(weights.path, what=what, error=registry.ModelLoadError, mmap=True)
            except registry.ModelLoadError as exc:
                raise RunError(f"{key}: {exc}", exit_code=2) from None


def prepare(spec: JobSpec, layout: str | None) -> tuple[JobSpec, fsio.StorageOptions, list[str], list[PlannedStage], list[str]]:
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
    few: dict[str, Any] = {}
    if spec.few_shot is not None:
        try:
            chosen, missing, ref_layout = fewshot.choose(spec, manifest, storage, lambda m: None)
        except fewshot.FewShotError as exc:
            raise RunError(str(exc), exit_code=2) from None
        few = {"few_shot": {"method": spec.few_shot_method(), "k": spec.few_shot.k, "reference": spec.few_shot.reference,
                            "reference_layout": ref_layout,
                            "references_by_category": {str(k): int(v) for k, v in chosen.groupby("category").size().items()},
                            "categories_without_references": missing}}
    if spec.mutual is not None:
        pools = mutual.choose(spec, manifest).groupby("category").size()
        few["mutual"] = {"pool_size": spec.mutual.pool_size, "transductive": True,
                         "pool_images_by_category": {str(k): int(v) for k, v in pools.items()},
                         "too_small": sorted(str(k) for k, v in pools.items() if v < mutual.MIN_POOL)}
    return {
        "input": input_uri,
        "layout": used_layout,
        "images": len(manifest),
        "images_by_category": {str(k): int(v) for k, v in manifest["category"].value_counts().sort_index().items()},
        "labelled_images": int(manifest["gt_label"].notna().sum()),
        "listing_errors": int(manifest["list_error_type"].notna().sum()),
        "skipped_at_listing": dict(manifest.attrs.get("skipped", {})),
        "shards": -(-len(manifest) // spec.shard_size),
        "plan": [*fewshot.plan_entries(spec, resources=True), *mutual.plan_entries(spec),
                 *({"stage": p.name, "kind": p.kind, **_fused_parts(p), **p.resources.model_dump(exclude_none=True)}
                   for p in stages)],
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

    ``then`` is called with the result after ``run.json`` is written, while the run's Ray session
    is still open (the CLI evaluates there instead of starting a second Ray). ``progress_stream``:
    where a terminal progress bar is drawn (when it is a TTY; else progress goes to ``log``).
    ``log_name``: the command's log file is copied to ``RUN/logs/<log_name>`` when it ends (by the
    caller, :mod:`pipeline.runtime.console`); run.json names it (``log``)."""
    from pipeline.runtime.executors import ExecutorError, check, execute, plan_session
    from pipeline.runtime.session import CONFIG_ERRORS, LOAD_ERRORS, failure

    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.monotonic()
    run_id = run_id or new_run_id(started)
    problem = check_run_id(run_id)
    if problem:
        raise RunError(problem, exit_code=2)
    executor = spec.runtime.executor
    try:
        check(executor, address)
    except ExecutorError as exc:
        raise RunError(str(exc), exit_code=2) from None
    spec, storage, tables, stages, result_columns = prepare(spec, layout)

    run_dir = fsio.join(fsio.normalise(output_uri), run_id)
    plan_uri = fsio.join(run_dir, "_plan.json")
    try:
        finished = fsio.exists(fsio.join(run_dir, "run.json"), storage)
        interrupted = fsio.exists(plan_uri, storage)
    except Exception as exc:
        raise RunError(f"output {output_uri}: cannot be reached: {exc}", exit_code=2) from None
    t0 = time.monotonic()
    lease = Lease(run_dir, storage)  # one process works on a run folder at a time
    if finished and not resume:
        raise RunError(f"run {run_dir} already exists (it has a run.json); choose another --run-id", exit_code=2)

    def take_lease() -> None:
        """Before the first write (a refused run writes nothing); released when the run ends."""
        try:
            taken_over = lease.acquire(run_id, takeover=resume, timeout_s=spec.lease_timeout_s)
        except LeaseHeld as exc:
            raise RunError(str(exc), exit_code=2) from None
        except Exception as exc:
            raise RunError(f"output {run_dir}: cannot be written: {exc}", exit_code=2) from None
        held.callback(lease.release)
        if taken_over:
            log(f"took over the lease of a stopped attempt ({taken_over.get('host')} pid {taken_over.get('pid')}, "
                f"since {taken_over.get('started')})")

    if resume and finished:  # a run that already succeeded: nothing to do, nothing written (no lease either)
        record = read_json(fsio.join(run_dir, "run.json"), storage)
        if record.get("status") == "succeeded":
            if interrupted and _comparable(read_json(plan_uri, storage)["spec"]) != _comparable(spec.redacted()):
                raise RunError(f"run {run_dir} was started with a different job spec; resume it with `zsad resume {run_dir}`",
                               exit_code=2)
            counts = record.get("counts", {})
            return RunResult(run_id, run_dir, "succeeded", int(counts.get("images", 0)), int(counts.get("ok", 0)),
                             int(counts.get("failed", 0)), record, 0, already=True)

    with contextlib.ExitStack() as held:
        if resume:
            take_lease()
            if not interrupted:
                raise RunError(f"nothing to resume at {run_dir}: no _plan.json (start it without --resume)", exit_code=2)
            plan = read_json(plan_uri, storage)  # _plan.json: what the run was started with
            if _comparable(plan["spec"]) != _comparable(spec.redacted()):
                raise RunError(f"run {run_dir} was started with a different job spec; resume it with `zsad resume {run_dir}`", exit_code=2)
            input_uri, used_layout, shard_size = plan["input"], plan["layout"], int(plan["shard_size"])
            skipped = dict(plan.get("skipped", {}))
            manifest = read_manifest(fsio.join(run_dir, "inputs.parquet"), storage)
            if spec.few_shot is not None:
                few_missing, few_layout = list(plan["few_shot"]["missing"]), plan["few_shot"]["layout"]
                chosen = fewshot.read_chosen(run_dir, storage)
            if spec.mutual is not None:
                pools_chosen = mutual.read_chosen(run_dir, storage)
        else:
            if interrupted:
                take_lease()  # a live holder: "in progress"; a gone one: "was interrupted"
                raise RunError(f"run {run_dir} was interrupted; continue it with --resume (or `zsad resume {run_dir}`)", exit_code=2)
            try:
                used_layout, manifest = list_inputs(input_uri, spec.data, storage)
            except InputError as exc:
                raise RunError(str(exc), exit_code=2) from None
            shard_size = spec.shard_size
            skipped = dict(manifest.attrs.get("skipped", {}))
            if skipped:
                log(f"left out at listing: {skipped_text(skipped)}")
            if spec.skip_scored:
                before = len(manifest)
                manifest = unscored(manifest, spec.skip_scored, storage, exclude=run_dir)
                log(f"incremental: {before - len(manifest)} of {before} images already scored ok under {spec.skip_scored}; "
                    f"{len(manifest)} to score")
            if spec.few_shot is not None:  # references are chosen before anything is written
                try:
                    chosen, few_missing, few_layout = fewshot.choose(spec, manifest, storage, log)
                except fewshot.FewShotError as exc:
                    raise RunError(str(exc), exit_code=2) from None
            if spec.mutual is not None:
                pools_chosen = mutual.choose(spec, manifest)
            take_lease()
            try:
                write_manifest(manifest, fsio.join(run_dir, "inputs.parquet"), storage)
                if spec.few_shot is not None:
                    fewshot.write_chosen(chosen, run_dir, storage)
                if spec.mutual is not None:
                    mutual.write_chosen(pools_chosen, run_dir, storage)
                write_json(plan_uri, {"run_id": run_id, "input": input_uri, "layout": used_layout, "shard_size": shard_size,
                                      "images": len(manifest), "skipped": skipped, "spec": spec.redacted(),
                                      **({"few_shot": {"layout": few_layout, "missing": few_missing}}
                                         if spec.few_shot is not None else {})}, storage)
            except OSError as exc:
                raise RunError(f"output {run_dir}: cannot be written: {exc}", exit_code=2) from None
        list_s = time.monotonic() - t0

        sink = ShardSink(run_dir, tables, storage)
        shard_of = {iid: i // shard_size for i, iid in enumerate(manifest["image_id"])}
        expected = pd.Series(list(shard_of.values())).value_counts().to_dict()
        done = sink.markers()
        pending = manifest[[shard_of[i] not in done for i in manifest["image_id"]]].reset_index(drop=True)
        log(f"run {run_id}: {len(manifest)} images ({used_layout} layout) in {len(expected)} shards from {input_uri} -> {run_dir}")
        if resume:
            log(f"resuming: {len(done)} shards done, {len(expected) - len(done)} to run ({len(pending)} images)")
        if spec.random_weights:
            log(f"WARNING: random weights for {', '.join(spec.random_models())} (allow_random_weights: true): "
                "scores are NOT meaningful results")

        values = run_values(spec, run_id)
        few_record: dict[str, Any] | None = None
        pool_entries: dict[str, dict[str, Any]] = {}
        pool_summary: dict[str, Any] = {"built": [], "reused": []}
        rscin_record: dict[str, Any] | None = None
        progress = Progress(len(pending), log, stream=progress_stream)
        plan_error: str | None = None
        unusable_weights = False
        output_lost = False
        session_info: dict[str, Any] = {}
        t_plan = time.monotonic()
        first_result_s: float | None = None
        first_result_rows = 0
        tallies: dict[int, ShardTally] = {}
        write_s = 0.0
        with contextlib.ExitStack() as ray_stack:  # the run's Ray session stays open until ``then`` has run
            try:
                if len(pending):
                    session = ray_stack.enter_context(plan_session(executor, address, log, spec))
                    if executor == "ray":
                        session_info = {"address": session["address"], "resources": dict(session["resources"])}
                    if spec.few_shot is not None:  # the banks, before any image is scored
                        entries, summary = fewshot.build_banks(spec, chosen, run_dir, storage, session, log)
                        few_record = fewshot.record(spec, run_dir, few_layout, few_missing, entries, summary)
                        find_stage(stages, "clip_score").banks = entries
                    if spec.mutual is not None:  # the pools, before any image is scored
                        sizes = manifest.groupby("category").size().to_dict()
                        pool_entries, pool_summary = mutual.build_pools(spec, pools_chosen, sizes, run_dir, storage, session, log)
                        find_stage(stages, "clip_score").pools = pool_entries
                    def save_stats(text: str) -> None:
                        name = "ray_data_stats.txt" if executor == "ray" else "local_stats.txt"
                        fs_, path_ = fsio.filesystem(fsio.join(run_dir, name), storage)
                        with fs_.open(path_, "w") as fh:
                            fh.write(text)

                    inputs = source_rows(pending)
                    results = execute(spec, stages, inputs, result_columns, session, log, on_stats=save_stats)
                    def waiting(quiet: float) -> None:
                        limit = f"; stall_timeout_s stops the run after {spec.stall_timeout_s:g} s" if spec.stall_timeout_s else ""
                        log(f"waiting for results: none for {quiet:.0f} s ({progress.done}/{progress.total} images done; "
                            f"models loading or a slow batch{limit})")

                    # closed as soon as the loop ends, early too: the plan stops with it (the local
                    # executor runs it in this process and must not go on scoring after a failure)
                    with contextlib.closing(watched(results, spec.stall_timeout_s, on_wait=waiting)) as stream:
                        for batch in stream:
                            if first_result_s is None:
                                first_result_s, first_result_rows = time.monotonic() - t_plan, batch.num_rows
                            shards = np.array([shard_of[i] for i in batch.column("image_id").to_pylist()])
                            t_w = time.monotonic()
                            for k in dict.fromkeys(shards.tolist()):
                                part = batch.filter(pa.array(shards == k))
                                sink.append(k, shard_tables(part, sink.tables, values))
                                tally = tallies.setdefault(k, ShardTally())
                                tally.add(part)
                                if tally.images == expected[k]:
                                    sink.finish(k, tallies.pop(k).marker())
                                    lease.heartbeat()
                            write_s += time.monotonic() - t_w
                            progress.update(batch.num_rows, sum(s != "ok" for s in batch.column("status").to_pylist()))
            except Exception as exc:  # the plan itself failed (model load, cluster lost): record and report
                error_type, text = failure(exc)
                plan_error = f"{error_type}: {text}"
                unusable_weights = error_type in LOAD_ERRORS or error_type in CONFIG_ERRORS
                log(f"run failed: {plan_error}")
            finally:
                sink.discard()  # unfinished shards: no marker, rerun in full on resume
            plan_s = time.monotonic() - t_plan

            try:
                markers = sink.markers()
            except Exception as exc:  # the output storage went away: what this attempt finished is known
                kind, text = failure(exc)
                log(f"cannot read the shard markers at {run_dir} ({kind}: {text}); "
                    f"counting the {len(sink.finished)} shards this attempt finished")
                markers = dict(sink.finished)
                output_lost = True
            busy = {s: sum(m["busy"].get(s, 0.0) for m in markers.values()) for s in TIMED_STAGES}
            n_done = sum(m["images"] for m in markers.values())  # this attempt and earlier ones (resume)
            n_failed = sum(m["failed"] for m in markers.values())
            failed_by_stage: dict[str, int] = {}
            for m in markers.values():
                for stage_name, count in m.get("failed_by_stage", {}).items():
                    failed_by_stage[stage_name] = failed_by_stage.get(stage_name, 0) + count
            n_ok = n_done - n_failed
            n_missing = len(manifest) - n_done
            rate = n_failed / len(manifest) if len(manifest) else 0.0
            if plan_error:
                status, reason = "failed", plan_error
            elif n_missing:
                status, reason = "failed", f"{n_missing} images produced no result row"
            elif rate > spec.max_error_rate:
                status = "failed"
                reason = (
                    f"{n_failed} of {len(manifest)} images failed ({100 * rate:.1f}%), above max_error_rate "
                    f"{spec.max_error_rate:g}; see {fsio.join(run_dir, 'errors')}"
                )
            else:
                status, reason = "succeeded", None
            if spec.few_shot_method() == "april_gan" and not n_missing and not output_lost:
                try:  # the transductive pass needs every image of a category scored
                    fewshot.rescore_transductive(sink.files("scores"), storage, log)
                except Exception as exc:
                    kind, text = failure(exc)
                    status, reason = "failed", f"score_transductive could not be written ({kind}: {text})"
            if spec.mutual is not None and spec.mutual.rscin and not n_missing and not output_lost and not plan_error:
                try:  # RsCIN needs every image of a category scored
                    rscin_record = mutual.rescore_rscin(spec, sink.files("scores"), sink.files("embeddings"), storage, log)
                except Exception as exc:
                    kind, text = failure(exc)
                    status, reason = "failed", f"score_rscin could not be written ({kind}: {text})"
            if spec.few_shot is not None and few_record is None:  # no bank pass ran (nothing to score, or it failed)
                few_record = fewshot.record(spec, run_dir, few_layout, few_missing, {}, {"built": [], "reused": []})
            ended = dt.datetime.now(dt.timezone.utc)
            record = {
                "run_id": run_id,
                "status": status,
                "reason": reason,
                "input": input_uri,
                "layout": used_layout,
                "output": run_dir,
                "started": started.isoformat(),
                "ended": ended.isoformat(),
                "wall_seconds": round(time.monotonic() - t_start, 3),
                "counts": {"images": len(manifest), "ok": n_ok, "failed": n_failed, "missing": n_missing},
                "failed_by_stage": failed_by_stage,
                "error_rate": rate,
                "max_error_rate": spec.max_error_rate,
                "random_weights": spec.random_weights,
                "model": {k: values[k] for k in MODEL_KEYS},
                "map_range": [values["map_min"], values["map_max"]],
                "stage_seconds": {
                    "list_wall": round(list_s, 3),
                    "plan_wall": round(plan_s, 3),
                    "first_result_wall": None if first_result_s is None else round(first_result_s, 3),
                    "write_wall": round(write_s, 3),  # streaming rows into shard files + markers, inside plan_wall
                    **{f"{s}_busy": round(busy[s], 3) for s in TIMED_STAGES},
                },
                "plan": [*fewshot.plan_entries(spec), *mutual.plan_entries(spec),
                         *({"stage": p.name, "kind": p.kind, **_fused_parts(p)} for p in stages)],
                **({"few_shot": few_record} if few_record is not None else {}),
                **({"mutual": mutual.record(spec, run_dir, pool_entries, pool_summary, rscin_record)}
                   if spec.mutual is not None else {}),
                "skipped_at_listing": skipped,
                "first_result_rows": first_result_rows,
                "labelled_images": int(manifest["gt_label"].notna().sum()),
                **({"refine": {"refined": (refined := sum(m.get("refined", 0) for m in markers.values())),
                               "kept": n_ok - refined, "failed": failed_by_stage.get("sam_refine", 0)}}
                   if spec.sam_refine is not None else {}),
                "shards": {"size": shard_size, "count": len(expected), "done": len(markers)},
                "tables": {
                    **{t: sink.files(t) if t in tables and not output_lost else [] for t in
                       ("scores", "errors", "masks", "foreground", "tiles", "embeddings")},
                    "inputs": fsio.join(run_dir, "inputs.parquet"),
                },
                "executor": executor,
                "ray": session_info,
                "log": fsio.join(run_dir, "logs", log_name) if log_name else None,
                "host": socket.gethostname(),
                "versions": versions(),
                "spec": spec.redacted(),
            }
            try:
                write_json(fsio.join(run_dir, "run.json"), record, storage)
            except Exception as exc:
                kind, text = failure(exc)
                log(f"run.json could not be written to {run_dir} ({kind}: {text}); the finished shards there are intact")
            if status != "succeeded" and n_missing and unusable_weights:  # the same spec would fail again
                log(f"the run stopped on its spec or its weights ({plan_error}): fix them and start a new run; "
                    f"a resume would run the same spec again")
            elif status != "succeeded" and n_missing:
                log(f"continue the run with: zsad resume {run_dir}")
            exit_code = 0 if status == "succeeded" else (2 if unusable_weights else 1)
            result = RunResult(run_id, run_dir, status, len(manifest), n_ok, n_failed, record, exit_code)
            if then is not None:
                then(result)  # e.g. the evaluation, in the same Ray session
            return result
