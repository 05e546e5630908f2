"""``zsad export-maps RUN --out DIR``: a run's heatmaps and masks as ordinary files.

For each image with a stored map, under ``DIR`` at the image's path relative to the run's input
root (``category/<file name>`` for an image outside it, e.g. from a manifest), with the image's
extension replaced by:

- ``_map.png`` (``png16``, default): the stored 16-bit PNG itself, byte for byte (level q is the
  value ``map_min + q / 65535 * (map_max - map_min)``, as in the masks table);
- ``_map.png`` (``png8``): the same range on 256 grey levels (``round(q / 257)``), for viewers;
- ``_map.npy`` (``npy``): the float32 values;
- ``_mask.png``: the thresholded-map mask (0/255, map size), when the run stored one;
- ``_refined.png``: the SAM-refined mask (0/255, the image's size), when refined;
- ``_overlay.png`` (``--overlay``): the image with its heatmap blended in at the image's size, on
  ONE colour scale for every file (``--map-range``: ``stored`` by default, or ``LO,HI`` e.g. the
  range under a report's colour bar).

``index.csv`` lists every exported image (image_id, uri, category, score, files, map range). Two
images that would get the same name (same stem, other extension) get ``-<image_id>`` appended.
Reads the masks part files one row group at a time; local or s3:// on both sides.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io import fs as fsio
from pipeline.ops import rle
from pipeline.ops.heatmap import decode_png16_levels, dequantise
from pipeline.report import render
from pipeline.report.runread import ReportError, open_run, predicted_mask, read_image

FORMATS = ("png16", "png8", "npy")
COLUMNS = [
    "image_id",
    "uri",
    "category",
    "status",
    "map_png",
    "map_min",
    "map_max",
    "threshold",
    "mask_rle",
    "refined",
    "refine_rle",
]


@dataclass
class ExportResult:
    out: str
    images: int = 0
    files: int = 0
    skipped: int = 0  # rows without a map (failed images)
    problems: list[str] = field(default_factory=list)


def relative_name(uri: str, root: str, category: str) -> str:
    """The image's path under the export folder, without extension."""
    root = root.rstrip("/")
    if root and uri.startswith(root + "/"):
        rel = uri[len(root) + 1 :]
    else:
        rel = posixpath.join(category or "_", posixpath.basename(uri))
    stem, _ = posixpath.splitext(rel)
    return stem


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _scale(map_range: str, run_range: tuple[float, float]) -> render.ColourScale:
    if map_range == "stored":
        return render.ColourScale(*run_range, how="the maps' stored range")
    try:
        lo, hi = (float(v) for v in map_range.split(","))
        return render.ColourScale(lo, hi, how="given")
    except ValueError:
        raise ReportError(f"--map-range {map_range!r}: use stored or LO,HI (two numbers, LO < HI)") from None


def export_maps(
    run_uri: str,
    out_dir: str,
    *,
    fmt: str = "png16",
    overlay: bool = False,
    map_range: str = "stored",
    storage=None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    if fmt not in FORMATS:
        raise ReportError(f"--format {fmt!r}: use {', '.join(FORMATS)}")
    run = open_run(run_uri, storage)
    if not run.has_maps:
        raise ReportError(f"{run.uri}: the run has no heatmaps (its pixel.kind is none)")
    scale = _scale(map_range, run.map_range) if overlay else None
    out_dir = fsio.normalise(out_dir)
    root = str(run.record.get("input") or "")
    if root and not fsio.is_remote(root) and os.path.isfile(fsio.local_path(root)):
        root = os.path.dirname(root)  # a manifest file: paths relative to its folder
    scores = run.scores.set_index("image_id")["value"].to_dict()
    result = ExportResult(out_dir)
    used: set[str] = set()
    index = []
    fs, path = fsio.filesystem(fsio.join(run.uri, "masks"), storage)
    try:
        parts = sorted(fs.glob(posixpath.join(path, "*.parquet")))
    except FileNotFoundError:
        parts = []
    out_fs, out_path = fsio.filesystem(out_dir, storage)

    def put(name: str, data: bytes) -> str:
        target = posixpath.join(out_path, name) if fsio.is_remote(out_dir) else os.path.join(out_path, name)
        if not fsio.is_remote(out_dir):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        with out_fs.open(target, "wb") as fh:
            fh.write(data)
        result.files += 1
        return name

    for part in parts:
        with fs.open(part, "rb") as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in COLUMNS if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=32, columns=cols):
                for row in batch.to_pylist():
                    if row.get("status") != "ok" or row.get("map_png") is None:
                        result.skipped += 1
                        continue
                    stem = relative_name(row["uri"], root, row["category"])
                    if stem in used:
                        stem = f"{stem}-{row['image_id']}"
                    used.add(stem)
                    files = _export_one(row, stem, fmt, scale, put, storage, result)
                    result.images += 1
                    index.append(
                        {
                            "image_id": row["image_id"],
                            "uri": row["uri"],
                            "category": row["category"],
                            "score": scores.get(row["image_id"]),
                            "map_min": row["map_min"],
                            "map_max": row["map_max"],
                            "format": fmt,
                            **files,
                        }
                    )
    frame = pd.DataFrame(
        index,
        columns=[
            "image_id",
            "uri",
            "category",
            "score",
            "map_min",
            "map_max",
            "format",
            "map",
            "mask",
            "refined",
            "overlay",
        ],
    )
    put("index.csv", frame.to_csv(index=False).encode())
    log(
        f"export-maps: {result.images} images, {result.files} files under {out_dir}"
        + (f"; {result.skipped} rows without a map (failed images)" if result.skipped else "")
        + (f"; {len(result.problems)} problems, first: {result.problems[0]}" if result.problems else "")
    )
    return result


def _export_one(
    row: dict[str, Any], stem: str, fmt: str, scale, put, storage, result: ExportResult
) -> dict[str, str | None]:
    files: dict[str, str | None] = {"map": None, "mask": None, "refined": None, "overlay": None}
    lo, hi = row["map_min"], row["map_max"]
    if fmt == "png16":
        files["map"] = put(stem + "_map.png", row["map_png"])
    else:
        levels = decode_png16_levels(row["map_png"])
        if fmt == "png8":
            files["map"] = put(stem + "_map.png", _png(np.floor(levels / 257 + 0.5).astype(np.uint8)))
        else:
            buf = io.BytesIO()
            np.save(buf, dequantise(levels, lo, hi).astype(np.float32))
            files["map"] = put(stem + "_map.npy", buf.getvalue())
    if row.get("mask_rle"):
        files["mask"] = put(stem + "_mask.png", _png(rle.decode(json.loads(row["mask_rle"])).astype(np.uint8) * 255))
    if row.get("refined") and row.get("refine_rle"):
        files["refined"] = put(
            stem + "_refined.png", _png(rle.decode(json.loads(row["refine_rle"])).astype(np.uint8) * 255)
        )
    if scale is not None:
        rgb, why = read_image(row["uri"], storage)
        if rgb is None:
            result.problems.append(f"{row['uri']}: no overlay, the image cannot be read ({why})")
        else:
            pred, _ = predicted_mask(row)
            heat = dequantise(decode_png16_levels(row["map_png"]), lo, hi)
            files["overlay"] = put(
                stem + "_overlay.png",
                render.png_bytes(render.overlay(rgb, heat, scale, rgb.shape[:2], predicted=pred), colours=None),
            )
    return files
