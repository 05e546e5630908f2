"""The run record (``run.json``) and what it is made of: the run-level values every table row
stores (:func:`run_values`), the plan as run.json lists it (:func:`plan_entries`), the versions of
the software (:func:`versions`) and the record itself (:func:`run_record`), written last by
:mod:`pipeline.runtime.run`."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import time
from typing import Any

import numpy as np
import pandas as pd

import pipeline
from pipeline.config import JobSpec
from pipeline.io import contracts
from pipeline.io import fs as fsio
from pipeline.runtime.passes import CategoryPass
from pipeline.runtime.progress import timed_stages
from pipeline.stages.base import PlannedStage


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
MODEL_KEYS = ("score_method", "pixel_method", "prompt_set", "clip_model", "clip_weights", "clip_activation",
              "pixel_weights",
              "random_weights", "sam_model", "sam_weights")


def plan_entries(spec: JobSpec, stages: list[PlannedStage], passes: list[CategoryPass],
                 resources: bool = False) -> list[dict[str, Any]]:
    """run.json's ``plan``: the passes before the plan, its stages, the passes after it."""
    def entries(when: str) -> list[dict[str, Any]]:
        return [e for p in passes if p.when == when for e in p.plan_entries(resources)]

    return [*entries("before"),
            *({"stage": p.name, "kind": p.kind, **_fused_parts(p), **(p.resources.model_dump(exclude_none=True)
                                                                    if resources else {})} for p in stages),
            *entries("after")]


def run_record(run: Any, ended: dt.datetime, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """run.json of ``run`` (a :class:`pipeline.runtime.run._Run` that has counted its shards),
    ended at ``ended``, with the passes' ``sections``."""
    spec, manifest, markers, values, sink = run.spec, run.manifest, run.markers, run.values, run.sink
    return {
        "run_id": run.run_id,
        "status": run.status,
        "reason": run.reason,
        "input": run.input_uri,
        "layout": run.used_layout,
        "output": run.run_dir,
        "started": run.started.isoformat(),
        "ended": ended.isoformat(),
        "wall_seconds": round(time.monotonic() - run.t_start, 3),
        "counts": {"images": len(manifest), "ok": run.n_ok, "failed": run.n_failed, "missing": run.n_missing},
        "failed_by_stage": run.failed_by_stage,
        "error_rate": run.rate,
        "max_error_rate": spec.max_error_rate,
        "random_weights": spec.random_weights,
        "model": {k: values[k] for k in MODEL_KEYS},
        "map_range": [values["map_min"], values["map_max"]],
        "stage_seconds": {
            "list_wall": round(run.list_s, 3),
            "plan_wall": round(run.plan_s, 3),
            "first_result_wall": None if run.first_result_s is None else round(run.first_result_s, 3),
            "write_wall": round(run.write_s, 3),  # streaming rows into shard files + markers, inside plan_wall
            **{f"{s}_busy": round(run.busy[s], 3) for s in timed_stages()},
        },
        "plan": plan_entries(spec, run.stages, run.passes),
        **sections,
        "skipped_at_listing": run.skipped,
        "first_result_rows": run.first_result_rows,
        "labelled_images": int(manifest["gt_label"].notna().sum()),
        **({"refine": {"refined": (refined := sum(m.get("refined", 0) for m in markers.values())),
                       "kept": run.n_ok - refined, "failed": run.failed_by_stage.get("sam_refine", 0)}}
           if spec.sam_refine is not None else {}),
        "shards": {"size": run.shard_size, "count": len(run.expected), "done": len(markers)},
        "tables": {
            **{t: sink.files(t) if t in run.tables and not run.output_lost else [] for t in contracts.shard_tables()},
            "inputs": fsio.join(run.run_dir, "inputs.parquet"),
        },
        "executor": run.executor,
        "ray": run.session_info,
        "log": fsio.join(run.run_dir, "logs", run.log_name) if run.log_name else None,
        "host": socket.gethostname(),
        "versions": versions(),
        "spec": spec.redacted(),
    }
