"""The runs under an output root (``zsad runs OUTPUT``): one row per run folder, read from its run
record (``run.json``), or from its ``_plan.json`` while it is unfinished, plus the mean row of its
``metrics/`` table when it was evaluated. Local or object storage; nothing is written."""

from __future__ import annotations

import posixpath
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from pipeline.io import fs as fsio
from pipeline.io.lease import LEASE, is_stale
from pipeline.io.sinks import read_json_if_exists

COLUMNS = ("run_id", "status", "started", "images", "ok", "failed", "preset", "random_weights",
           "image_auroc", "pixel_auroc", "pixel_aupro")


def _mean_metrics(fs: Any, run: str) -> dict[str, Any]:
    """The ``mean`` row of the run's metrics table, or nothing when the run was not evaluated."""
    files = sorted(fs.glob(posixpath.join(run, "metrics", "*.parquet")))
    for f in files:
        with fs.open(f, "rb") as fh:
            table = pq.read_table(fh).to_pandas()
        mean = table[table["category"] == "mean"]
        if len(mean):
            return {k: float(mean[k].iloc[0]) if pd.notna(mean[k].iloc[0]) else None
                    for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
    return {}


def list_runs(output: str, storage: fsio.StorageOptions | None = None, lease_timeout_s: float = 3600.0) -> pd.DataFrame:
    """One row per run under ``output`` (columns :data:`COLUMNS`), oldest first. A folder with a
    ``_plan.json`` but no ``run.json`` is ``running`` while its lease is held, else ``unfinished``
    (interrupted: resumable)."""
    fs, root = fsio.filesystem(fsio.normalise(output), storage)
    rows = []
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{output}: no such folder or prefix") from None
    for run in sorted(entries):
        record = read_json_if_exists(fsio.unstrip(fs, posixpath.join(run, "run.json")), storage)
        plan = None if record else read_json_if_exists(fsio.unstrip(fs, posixpath.join(run, "_plan.json")), storage)
        if record is None and plan is None:
            continue  # not a zsad run
        if record is not None:
            counts = record.get("counts", {})
            row = {"run_id": record.get("run_id", posixpath.basename(run)), "status": record.get("status"),
                   "started": record.get("started"), "images": counts.get("images"), "ok": counts.get("ok"),
                   "failed": counts.get("failed"), "preset": record.get("spec", {}).get("name"),
                   "random_weights": record.get("random_weights")}
        else:
            holder = read_json_if_exists(fsio.unstrip(fs, posixpath.join(run, LEASE)), storage)
            state = "running" if holder is not None and not is_stale(holder, lease_timeout_s) else "unfinished"
            row = {"run_id": plan.get("run_id", posixpath.basename(run)), "status": state,
                   "started": holder.get("started") if holder else None,
                   "images": plan.get("images"), "ok": None, "failed": None, "preset": plan.get("spec", {}).get("name"),
                   "random_weights": None}
        rows.append({**row, **_mean_metrics(fs, run)})
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    return df.sort_values(["started", "run_id"], na_position="last", kind="stable").reset_index(drop=True)
