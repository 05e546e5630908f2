"""Reading a finished run folder for the report, the map export and the comparison.

Everything is read from the written tables (local or object storage), never recomputed: ``run.json``,
the few small columns of ``scores`` needed for plots (a few numbers per image, so a million-image
run is tens of MB), ``metrics`` and ``curves.json`` when the run was evaluated, ``errors``, and the
``masks`` rows of the few images a page shows: :func:`mask_rows` reads the ``image_id`` column of
each part file and then only the row groups that hold a wanted image, so the heatmaps of the rest
of the run are never fetched.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.errors import ZsadError
from pipeline.io import fs as fsio
from pipeline.io.images import DecodeError, decode_image
from pipeline.io.sinks import read_folder, read_json, read_json_if_exists
from pipeline.ops import rle
from pipeline.ops.heatmap import decode_png16

SCORE_COLUMNS = ["image_id", "uri", "category", "status", "score", "score_transductive", "max_pixel_score", "gt_label",
                 "height", "width", "error_stage", "error_type", "error_message"]
MASK_COLUMNS = ["image_id", "map_png", "map_min", "map_max", "threshold", "mask_rle", "refined", "refine_rle"]
#: image-score sources (zsad evaluate --image-score) -> scores column
SCORE_SOURCES = {"method": "score", "max_map": "max_pixel_score", "transductive": "score_transductive"}


class ReportError(ZsadError, RuntimeError):
    """A run folder that cannot be read for a report; the message names the folder and the problem."""

    exit_code = 2


@dataclass
class RunData:
    """What a page needs of one run (small: no heatmaps)."""

    uri: str
    storage: Any
    record: dict[str, Any]
    scores: pd.DataFrame  # SCORE_COLUMNS plus `value` (the image score the page ranks by) and mask_uri
    metrics: pd.DataFrame | None
    curves: dict[str, Any]
    score_source: str

    @property
    def run_id(self) -> str:
        return str(self.record.get("run_id") or posixpath.basename(self.uri.rstrip("/")))

    @property
    def random_weights(self) -> bool:
        return bool(self.record.get("random_weights"))

    @property
    def has_maps(self) -> bool:
        return self.record.get("model", {}).get("pixel_method", "none") != "none"

    @property
    def map_range(self) -> tuple[float, float]:
        lo, hi = self.record.get("map_range") or (0.0, 1.0)
        return float(lo), float(hi)


def open_run(uri: str, storage=None) -> RunData:
    """Read a finished run (one with ``run.json``); raises :class:`ReportError` otherwise."""
    uri = fsio.normalise(uri)
    try:
        record = read_json(fsio.join(uri, "run.json"), storage)
    except FileNotFoundError:
        plan = read_json_if_exists(fsio.join(uri, "_plan.json"), storage)
        what = (
            "an unfinished run (it has _plan.json but no run.json: resume it first)"
            if plan
            else "no zsad run (no run.json)"
        )
        raise ReportError(f"{uri}: {what}") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{uri}: run.json could not be read ({type(exc).__name__}: {exc})") from None
    scores = read_folder(fsio.join(uri, "scores"), storage, SCORE_COLUMNS)
    try:
        inputs = (
            pd.read_parquet(
                fsio.join(uri, "inputs.parquet"), columns=["image_id", "mask_uri"], storage_options=storage or None
            )
            if fsio.is_remote(uri)
            else pd.read_parquet(fsio.join(uri, "inputs.parquet"), columns=["image_id", "mask_uri"])
        )
        scores = scores.merge(inputs.drop_duplicates("image_id"), on="image_id", how="left")
    except (FileNotFoundError, OSError):
        scores["mask_uri"] = None
    metrics = read_folder(fsio.join(uri, "metrics"), storage)
    metrics = metrics if len(metrics) else None
    curves = read_json_if_exists(fsio.join(uri, "curves.json"), storage) or {}
    source = _score_source(record, metrics)
    column = SCORE_SOURCES[source]
    scores["value"] = pd.to_numeric(scores[column], errors="coerce")
    return RunData(uri, storage, record, scores, metrics, curves.get("categories", {}), source)


def _score_source(record: dict[str, Any], metrics: pd.DataFrame | None) -> str:
    """The image score the run was evaluated with, else what ``zsad evaluate`` would use (auto)."""
    if metrics is not None and "image_score_source" in metrics and len(metrics):
        source = str(metrics["image_score_source"].iloc[0])
        if source in SCORE_SOURCES:
            return source
    return "transductive" if (record.get("few_shot") or {}).get("method") == "april_gan" else "method"


def errors(run: RunData) -> pd.DataFrame:
    """The run's errors table (uri, category, stage, error_type, message)."""
    return read_folder(
        fsio.join(run.uri, "errors"), run.storage, ["image_id", "uri", "category", "stage", "error_type", "message"]
    )


def mask_rows(run: RunData, image_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The ``masks`` rows (:data:`MASK_COLUMNS`) of ``image_ids``, reading only the row groups that
    hold them."""
    wanted, found = set(image_ids), {}
    if not wanted or not run.has_maps:
        return found
    fs, path = fsio.filesystem(fsio.join(run.uri, "masks"), run.storage)
    try:
        files = sorted(fs.glob(posixpath.join(path, "*.parquet")))
    except FileNotFoundError:
        return found
    for f in files:
        if len(found) == len(wanted):
            break
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in MASK_COLUMNS if c in pf.schema_arrow.names]
            for g in range(pf.num_row_groups):
                ids = pf.read_row_group(g, columns=["image_id"]).column(0).to_pylist()
                hits = [i for i, v in enumerate(ids) if v in wanted and v not in found]
                if not hits:
                    continue
                table = pf.read_row_group(g, columns=cols).take(hits)
                for row in table.to_pylist():
                    found[row["image_id"]] = row
    return found


def heat(row: dict[str, Any]) -> np.ndarray | None:
    """The float map of a masks row (None when the row has none)."""
    if not row or row.get("map_png") is None:
        return None
    return decode_png16(row["map_png"], row["map_min"], row["map_max"])


def predicted_mask(row: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """The run's binary mask of a masks row and what it is: the SAM-refined mask when the row was
    refined, else the thresholded map's mask, else none."""
    if not row:
        return None, ""
    if row.get("refined") and row.get("refine_rle"):
        return rle.decode(_rle(row["refine_rle"])), "refined mask"
    if row.get("mask_rle"):
        t = row.get("threshold")
        return rle.decode(_rle(row["mask_rle"])), "thresholded mask" + (f" (map >= {t:g})" if finite(t) else "")
    return None, ""


def _rle(text: str) -> dict[str, Any]:
    import json

    return json.loads(text)


def read_image(uri: str, storage, max_pixels: int = 178_956_970) -> tuple[np.ndarray | None, str]:
    """(RGB uint8, "") of an input image, or (None, why) when it cannot be read now (moved, no access)."""
    try:
        return decode_image(fsio.read_bytes(uri, storage), max_pixels), ""
    except DecodeError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a picture that cannot be had is said, never fatal
        return None, f"{type(exc).__name__}: {exc}"


def read_truth(mask_uri: Any, storage) -> np.ndarray | None:
    """The ground-truth mask (bool) of an image, or None (no mask, or unreadable)."""
    if not isinstance(mask_uri, str) or not mask_uri:
        return None
    from pipeline.stages.evaluate import read_mask

    try:
        return read_mask(mask_uri, storage)
    except Exception:  # noqa: BLE001 - the outline is a display aid; the evaluation reports bad masks
        return None


def finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def write_page(out_uri: str, write_body, storage) -> int:
    """Write a page: ``write_body(fh)`` writes text into a local temporary file (so memory holds
    one section at a time), which then goes to ``out_uri`` (local path or s3://). Returns the bytes."""
    import os

    from pipeline.io.atomic import file_target

    with file_target(out_uri, storage) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            write_body(fh)
        return os.path.getsize(tmp)


__all__ = [
    "ReportError",
    "RunData",
    "open_run",
    "errors",
    "mask_rows",
    "heat",
    "predicted_mask",
    "read_image",
    "read_truth",
    "write_page",
]
