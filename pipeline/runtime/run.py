"""One run from start to finish: list -> inputs.parquet -> Ray plan -> scores/ + errors/ -> run.json.

``run.json`` is written LAST and only then does the run count as complete; its ``status`` is
``succeeded`` or ``failed`` (error budget exceeded, or the plan itself failed, with the cause).
"""

from __future__ import annotations

import datetime as dt
import platform
import posixpath
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

import pipeline
from pipeline.config import DataSpec, JobSpec
from pipeline.io import fs as fsio
from pipeline.io.layouts import InputError, list_inputs, write_manifest
from pipeline.io.sinks import ShardSink, read_json, write_json
from pipeline.io.weights import WeightsError, preflight
from pipeline.models import clip as clip_models
from pipeline.models.pixel import MAP_RANGE
from pipeline.runtime.ids import check_run_id, new_run_id

STAGES = ("decode", "foreground", "clip_score", "aggregate", "encode")
TILE_COLUMNS = ("run_id", "image_id", "category", "tile_index", "component_id", "x0", "y0", "x1", "y1", "reason",
                "tile_score", "component_score")


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
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.n_failed / self.n_images if self.n_images else 0.0


def versions() -> dict[str, str]:
    import open_clip
    import pyarrow
    import ray
    import torch

    return {
        "zsad": pipeline.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "pandas": pd.__version__,
        "numpy": np.__version__,
    }


class Progress:
    """Prints ``images done / total, images/s`` at most every ``interval`` seconds."""

    def __init__(self, total: int, log: Callable[[str], None], interval: float = 2.0) -> None:
        self.total, self.log, self.interval = total, log, interval
        self.done = self.failed = 0
        self.t0 = self._last = time.monotonic()

    def update(self, n: int, failed: int) -> None:
        self.done += n
        self.failed += failed
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            pct = 100.0 * self.done / max(self.total, 1)
            self.log(f"progress: {self.done}/{self.total} images ({pct:.0f}%), {rate:.1f} images/s, {self.failed} failed")


def _model_columns(spec: JobSpec) -> dict[str, Any]:
    return {
        "score_method": spec.score.kind,
        "pixel_method": spec.pixel.kind,
        "prompt_set": spec.score.prompt_set,
        "clip_model": spec.clip.model,
        "clip_weights": spec.clip.weights.describe() if spec.clip.weights else "random",
        "random_weights": spec.random_weights,
        "sam_model": spec.sam.model if spec.uses_sam() else None,
        "sam_weights": (spec.sam.weights.describe() if spec.sam.weights else "random") if spec.uses_sam() else None,
    }


def _nullable(values: pd.Series, keep: np.ndarray) -> list[Any]:
    """Values where ``keep`` (and finite, for floats), None elsewhere."""
    out = []
    for v, k in zip(values.tolist(), keep):
        if not k or v is None or v == "" or (isinstance(v, float) and not np.isfinite(v)):
            out.append(None)
        else:
            out.append(v)
    return out


def score_rows(batch: pd.DataFrame, run_id: str, labels: dict[str, Any], model_cols: dict[str, Any]) -> dict[str, list]:
    """A result batch from the plan -> columns of the ``scores`` table."""
    n = len(batch)
    ok = (batch["status"] == "ok").to_numpy()
    decoded = np.array([s != "decode" for s in batch["error_stage"].tolist()])
    cols: dict[str, list] = {
        "run_id": [run_id] * n,
        "image_id": batch["image_id"].tolist(),
        "uri": batch["uri"].tolist(),
        "category": batch["category"].tolist(),
        "gt_label": [labels.get(i) for i in batch["image_id"]],
        "score": _nullable(batch["score"], ok),
        "score_language": _nullable(batch["score_language"], ok),
        "score_vision": _nullable(batch["score_vision"], ok),
        "max_pixel_score": _nullable(batch["max_pixel_score"], ok),
        "status": batch["status"].tolist(),
        "error_stage": _nullable(batch["error_stage"], ~ok),
        "error_type": _nullable(batch["error_type"], ~ok),
        "error_message": _nullable(batch["error_message"], ~ok),
        "height": _nullable(batch["height"], decoded),
        "width": _nullable(batch["width"], decoded),
        "decode_ms": _nullable(batch["decode_ms"], np.ones(n, bool)),
        "clip_score_ms": _nullable(batch["clip_score_ms"], ok),
        "encode_ms": _nullable(batch["encode_ms"], ok & (batch["map_height"].to_numpy() > 0)),
    }
    for key, value in model_cols.items():
        cols[key] = [value] * n
    has_fg, has_tiles = "foreground_ms" in batch, "scoring_mode" in batch
    if has_tiles:
        cols["scoring_mode"] = [m if k and m else "none" for m, k in zip(batch["scoring_mode"].tolist(), ok)]
        cols["n_tiles"] = _nullable(batch["n_tiles"], ok)
        cols["aggregate_ms"] = _nullable(batch["aggregate_ms"], ok)
    else:
        cols["scoring_mode"] = ["whole_image" if k else "none" for k in ok]
        cols["n_tiles"] = [None] * n
        cols["aggregate_ms"] = [None] * n
    if has_fg:
        reached = np.array([s != "decode" for s in batch["error_stage"].tolist()])
        cols["n_components"] = [len(np.asarray(c).reshape(-1, 7)) if k else None for c, k in zip(batch["fg_components"], ok)]
        cols["foreground_ms"] = _nullable(batch["foreground_ms"], reached)
    else:
        cols["n_components"] = [None] * n
        cols["foreground_ms"] = [None] * n
    return cols


def foreground_rows(batch: pd.DataFrame, run_id: str, kind: str) -> dict[str, list]:
    """A result batch -> columns of the ``foreground`` table (one row per image)."""
    n = len(batch)
    ok = (batch["status"] == "ok").to_numpy()
    tables = [np.asarray(c, dtype=np.int64).reshape(-1, 7) for c in batch["fg_components"]]
    pick = lambda col: [col(t) if o else None for t, o in zip(tables, ok)]  # noqa: E731
    return {
        **_identity(batch, run_id),
        "kind": [kind] * n,
        "foreground_rle": [r if o and r else None for r, o in zip(batch["fg_rle"].tolist(), ok)],
        "n_sam_masks": _nullable(batch["fg_sam_masks"], ok),
        "n_kept_masks": _nullable(batch["fg_kept_masks"], ok),
        "n_components": pick(len),
        "component_ids": pick(lambda t: t[:, 0].tolist()),
        "component_boxes": pick(lambda t: t[:, 1:5].tolist()),
        "component_areas": pick(lambda t: t[:, 5].tolist()),
        "component_parts": pick(lambda t: t[:, 6].tolist()),
    }


def tile_rows(batch: pd.DataFrame, run_id: str) -> dict[str, list]:
    """A result batch -> columns of the ``tiles`` table (one row per tile of each scored image)."""
    rows = []
    for row in batch[batch["status"] == "ok"].itertuples():
        boxes = np.asarray(row.tiles, dtype=np.int64).reshape(-1, 5)
        scores = np.asarray(row.tile_scores, dtype=np.float64)
        comp = np.asarray(row.tile_component_scores, dtype=np.float64)
        for t, (b, reason) in enumerate(zip(boxes, str(row.tile_reasons).split(","))):
            rows.append({"run_id": run_id, "image_id": row.image_id, "category": row.category, "tile_index": t,
                         "component_id": int(b[0]), "x0": int(b[1]), "y0": int(b[2]), "x1": int(b[3]), "y1": int(b[4]),
                         "reason": reason, "tile_score": float(scores[t]), "component_score": float(comp[t])})
    return {k: [r[k] for r in rows] for k in TILE_COLUMNS}


def _identity(batch: pd.DataFrame, run_id: str) -> dict[str, list]:
    """The columns that open every per-image table: run_id, image_id, uri, category, status."""
    return {"run_id": [run_id] * len(batch), **{k: batch[k].tolist() for k in ("image_id", "uri", "category", "status")}}


def mask_rows(batch: pd.DataFrame, run_id: str, method: str, map_range: tuple[float, float], threshold: float | None) -> dict[str, list]:
    """A result batch -> columns of the ``masks`` table (one row per image; null maps for failures)."""
    n = len(batch)
    has = ((batch["status"] == "ok") & (batch["map_height"] > 0)).to_numpy()
    rles = [None if not h or not r else r for r, h in zip(batch["mask_rle"].tolist(), has)]
    return {
        **_identity(batch, run_id),
        "method": [method] * n,
        "map_png": [p if h else None for p, h in zip(batch["map_png"].tolist(), has)],
        "map_height": _nullable(batch["map_height"], has),
        "map_width": _nullable(batch["map_width"], has),
        "map_min": [float(map_range[0])] * n,
        "map_max": [float(map_range[1])] * n,
        "threshold": [threshold if h and threshold is not None else None for h in has],
        "mask_rle": rles,
        "refined": [False] * n,
    }


def error_rows(batch: pd.DataFrame, run_id: str) -> dict[str, list]:
    bad = batch[batch["status"] != "ok"]
    return {
        "run_id": [run_id] * len(bad),
        "image_id": bad["image_id"].tolist(),
        "uri": bad["uri"].tolist(),
        "category": bad["category"].tolist(),
        "stage": [v or "unknown" for v in bad["error_stage"].tolist()],
        "error_type": [v or "Unknown" for v in bad["error_type"].tolist()],
        "message": [v or "(no message)" for v in bad["error_message"].tolist()],
    }


def _shard_columns(rows: pd.DataFrame, tables: list[str], run_id: str, labels, model_cols, spec: JobSpec) -> dict[str, dict]:
    """One result batch (rows of one shard) -> the columns of every output table."""
    columns = {"scores": score_rows(rows, run_id, labels, model_cols), "errors": error_rows(rows, run_id)}
    if "masks" in tables:
        columns["masks"] = mask_rows(rows, run_id, spec.pixel.kind, MAP_RANGE, spec.maps.threshold)
    if "foreground" in tables:
        columns["foreground"] = foreground_rows(rows, run_id, spec.foreground.kind)
    if "tiles" in tables:
        columns["tiles"] = tile_rows(rows, run_id)
    return columns


class ShardTally:
    """What a shard's done marker says: images, failed (total and per stage), busy seconds per stage;
    added up batch by batch as the shard's rows stream through."""

    def __init__(self) -> None:
        self.images = self.failed = 0
        self.busy = {s: 0.0 for s in STAGES}
        self.failed_by_stage: dict[str, int] = {}

    def add(self, rows: pd.DataFrame) -> None:
        self.images += len(rows)
        bad = rows["status"] != "ok"
        self.failed += int(bad.sum())
        for s in STAGES:
            if f"{s}_ms" in rows:
                self.busy[s] += float(np.nansum(rows[f"{s}_ms"].to_numpy(dtype=float))) / 1000.0
        for stage, count in rows.loc[bad, "error_stage"].value_counts().items():
            self.failed_by_stage[str(stage)] = self.failed_by_stage.get(str(stage), 0) + int(count)

    def marker(self) -> dict[str, Any]:
        return {"images": self.images, "failed": self.failed, "busy": self.busy, "failed_by_stage": self.failed_by_stage}


def _key(row) -> tuple:
    """Identity of an input file version: (uri, size, etag or else mtime)."""
    version = row.etag if isinstance(row.etag, str) and row.etag else (None if pd.isna(row.mtime) else float(row.mtime))
    return (row.uri, None if pd.isna(row.size) else int(row.size), version)


def scored_keys(root: str, storage, exclude: str | None = None) -> set[tuple]:
    """(uri, size, etag|mtime) of every image scored ok by the runs under ``root`` (finished or
    interrupted: only shards with a done marker have score files)."""
    fs, path = fsio.filesystem(fsio.normalise(root), storage)
    keys: set[tuple] = set()
    try:
        plans = fs.glob(posixpath.join(path, "*", "_plan.json"))
    except FileNotFoundError:
        return keys
    for plan in plans:
        run = posixpath.dirname(plan)
        if exclude and fsio.normalise(fsio.unstrip(fs, run)) == fsio.normalise(exclude):
            continue
        try:
            inputs = read_manifest(fsio.unstrip(fs, posixpath.join(run, "inputs.parquet")), storage)
        except FileNotFoundError:
            continue
        ok: set[str] = set()
        for f in fs.glob(posixpath.join(run, "scores", "*.parquet")):
            with fs.open(f, "rb") as fh:
                import pyarrow.parquet as pq

                t = pq.read_table(fh, columns=["image_id", "status"]).to_pandas()
            ok.update(t.loc[t["status"] == "ok", "image_id"])
        keys.update(_key(r) for r in inputs.itertuples() if r.image_id in ok)
    return keys


class StallError(RuntimeError):
    """No result arrived within the configured stall timeout."""


def watched(results, timeout_s: float | None):
    """Yield from the iterator ``results`` (consumed in a background thread); raise
    :class:`StallError` when no item arrives for ``timeout_s`` seconds, instead of hanging."""
    if not timeout_s:
        yield from results
        return
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=4)
    end = object()

    def pump() -> None:
        try:
            for item in results:
                q.put(item)
            q.put(end)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    threading.Thread(target=pump, name="zsad-results", daemon=True).start()
    while True:
        try:
            item = q.get(timeout=timeout_s)
        except queue.Empty:
            raise StallError(
                f"no result for {timeout_s:g} s (stall_timeout_s): a stage is stuck; the run was stopped"
            ) from None
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _comparable(spec_data: dict[str, Any]) -> dict[str, Any]:
    """A spec as stored in _plan.json, without the (redacted) storage secrets."""
    storage = {k: v for k, v in spec_data.get("storage", {}).items() if k not in ("access_key_id", "secret_access_key")}
    return {**spec_data, "storage": storage}


def read_manifest(uri: str, storage) -> pd.DataFrame:
    fs, path = fsio.filesystem(uri, storage)
    with fs.open(path, "rb") as fh:
        import pyarrow.parquet as pq

        df = pq.read_table(fh).to_pandas()
    df["gt_label"] = df["gt_label"].astype("Int64")
    return df


def preflight_spec(spec: JobSpec, storage: fsio.StorageOptions) -> None:
    """Fail fast on the driver, before Ray starts: model name, pretrained tag, weights location."""
    try:
        clip_models.check_model_name(spec.clip.model)
        w = spec.clip.weights
        if w is not None and w.tag and w.tag not in clip_models.known_tags(spec.clip.model):
            known = ", ".join(clip_models.known_tags(spec.clip.model)) or "none"
            raise clip_models.ModelLoadError(f"open_clip has no pretrained tag {w.tag!r} for {spec.clip.model} (known: {known})")
        preflight(w, storage)
    except (clip_models.ModelLoadError, WeightsError) as exc:
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
) -> RunResult:
    """Run ``spec`` over ``input_uri`` and write the tables under ``output_uri/run_id``."""
    from pipeline.runtime.ray_plan import run_plan
    from pipeline.runtime.session import ray_session, root_cause

    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.monotonic()
    run_id = run_id or new_run_id(started)
    problem = check_run_id(run_id)
    if problem:
        raise RunError(problem, exit_code=2)
    storage = fsio.storage_options(spec.storage)
    if layout:
        spec = spec.model_copy(update={"data": DataSpec(**{**spec.data.model_dump(), "layout": layout})})
    preflight_spec(spec, storage)

    run_dir = fsio.join(fsio.normalise(output_uri), run_id)
    plan_uri = fsio.join(run_dir, "_plan.json")
    try:
        finished = fsio.exists(fsio.join(run_dir, "run.json"), storage)
        interrupted = fsio.exists(plan_uri, storage)
    except Exception as exc:
        raise RunError(f"output {output_uri}: cannot be reached: {exc}", exit_code=2) from None
    t0 = time.monotonic()
    if resume:
        if not interrupted:
            raise RunError(f"nothing to resume at {run_dir}: no _plan.json (start it without --resume)", exit_code=2)
        plan = read_json(plan_uri, storage)
        if _comparable(plan["spec"]) != _comparable(spec.redacted()):
            raise RunError(f"run {run_dir} was started with a different job spec; resume it with `zsad resume {run_dir}`", exit_code=2)
        if finished and read_json(fsio.join(run_dir, "run.json"), storage).get("status") == "succeeded":
            raise RunError(f"run {run_dir} already succeeded; nothing to resume", exit_code=2)
        input_uri, used_layout, shard_size = plan["input"], plan["layout"], int(plan["shard_size"])
        manifest = read_manifest(fsio.join(run_dir, "inputs.parquet"), storage)
    else:
        if finished:
            raise RunError(f"run {run_dir} already exists (it has a run.json); choose another --run-id", exit_code=2)
        if interrupted:
            raise RunError(f"run {run_dir} was interrupted; continue it with --resume (or `zsad resume {run_dir}`)", exit_code=2)
        try:
            used_layout, manifest = list_inputs(input_uri, spec.data, storage)
        except InputError as exc:
            raise RunError(str(exc), exit_code=2) from None
        shard_size = spec.shard_size
        if spec.skip_scored:
            before = len(manifest)
            scored = scored_keys(spec.skip_scored, storage, exclude=run_dir)
            keep = [_key(r) not in scored for r in manifest.itertuples()]
            manifest = manifest[keep].reset_index(drop=True)
            log(f"incremental: {before - len(manifest)} of {before} images already scored ok under {spec.skip_scored}; "
                f"{len(manifest)} to score")
        try:
            write_manifest(manifest, fsio.join(run_dir, "inputs.parquet"), storage)
            write_json(plan_uri, {"run_id": run_id, "input": input_uri, "layout": used_layout, "shard_size": shard_size,
                                  "images": len(manifest), "spec": spec.redacted()}, storage)
        except OSError as exc:
            raise RunError(f"output {run_dir}: cannot be written: {exc}", exit_code=2) from None
    list_s = time.monotonic() - t0

    with_maps = spec.pixel.kind != "none"
    tables = ["scores", "errors"] + (["masks"] if with_maps else []) + (["foreground"] if spec.foreground else [])
    if spec.tiling is not None and spec.tiling.write_table:
        tables.append("tiles")
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

    labels = {i: (None if pd.isna(v) else int(v)) for i, v in zip(manifest["image_id"], manifest["gt_label"])}
    model_cols = _model_columns(spec)
    progress = Progress(len(pending), log)
    plan_error: str | None = None
    session_info: dict[str, Any] = {}
    t_plan = time.monotonic()
    first_result_s: float | None = None
    first_result_rows = 0
    tallies: dict[int, ShardTally] = {}
    write_s = 0.0
    try:
        if len(pending):
            with ray_session(address, log) as session:
                session_info = {"address": session["address"], "resources": dict(session["resources"])}
                def save_stats(text: str) -> None:
                    fs_, path_ = fsio.filesystem(fsio.join(run_dir, "ray_data_stats.txt"), storage)
                    with fs_.open(path_, "w") as fh:
                        fh.write(text)

                results = run_plan(spec, pending, storage, session, log, on_stats=save_stats)
                for batch in watched(results, spec.stall_timeout_s):
                    if first_result_s is None:
                        first_result_s, first_result_rows = time.monotonic() - t_plan, len(batch)
                    shards = batch["image_id"].map(shard_of)
                    t_w = time.monotonic()
                    for k, part in batch.groupby(shards.to_numpy()):
                        k = int(k)
                        sink.append(k, _shard_columns(part, sink.tables, run_id, labels, model_cols, spec))
                        tally = tallies.setdefault(k, ShardTally())
                        tally.add(part)
                        if tally.images == expected[k]:
                            sink.finish(k, tallies.pop(k).marker())
                    write_s += time.monotonic() - t_w
                    progress.update(len(batch), int((batch["status"] != "ok").sum()))
    except Exception as exc:  # the plan itself failed (model load, cluster lost): record and report
        plan_error = root_cause(exc)
        log(f"run failed: {plan_error}")
    finally:
        sink.discard()  # unfinished shards: no marker, rerun in full on resume
    plan_s = time.monotonic() - t_plan

    markers = sink.markers()
    busy = {s: sum(m["busy"].get(s, 0.0) for m in markers.values()) for s in STAGES}
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
    ended = dt.datetime.now(dt.timezone.utc)
    manifest_json = {
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
        "model": model_cols,
        "stage_seconds": {
            "list_wall": round(list_s, 3),
            "plan_wall": round(plan_s, 3),
            "first_result_wall": None if first_result_s is None else round(first_result_s, 3),
            "write_wall": round(write_s, 3),  # streaming rows into shard files + markers, inside plan_wall
            "decode_busy": round(busy["decode"], 3),
            "foreground_busy": round(busy["foreground"], 3),
            "clip_score_busy": round(busy["clip_score"], 3),
            "aggregate_busy": round(busy["aggregate"], 3),
            "encode_busy": round(busy["encode"], 3),
        },
        "first_result_rows": first_result_rows,
        "labelled_images": int(manifest["gt_label"].notna().sum()),
        "shards": {"size": shard_size, "count": len(expected), "done": len(markers)},
        "tables": {
            "scores": sink.files("scores"),
            "errors": sink.files("errors"),
            "masks": sink.files("masks") if with_maps else [],
            "foreground": sink.files("foreground") if "foreground" in tables else [],
            "tiles": sink.files("tiles") if "tiles" in tables else [],
            "inputs": fsio.join(run_dir, "inputs.parquet"),
        },
        "ray": session_info,
        "host": socket.gethostname(),
        "versions": versions(),
        "spec": spec.redacted(),
    }
    write_json(fsio.join(run_dir, "run.json"), manifest_json, storage)
    return RunResult(run_id, run_dir, status, len(manifest), n_ok, n_failed, manifest_json)
