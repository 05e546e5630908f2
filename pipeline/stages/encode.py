"""Encode stage (CPU): float anomaly maps -> 16-bit PNG on the method's fixed range + COCO RLE mask.

Quantising every map of a run on the same fixed range (``[0, 1]`` for probability maps) puts them
on one grid of 65536 levels, so evaluation from stored maps is exact. The float map column is
dropped here, so only compact bytes travel on.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipeline.ops import heatmap, rle
from pipeline.stages.base import check_columns
from pipeline.stages.records import each_row, object_column

STAGE = "encode"


class EncodeStage:
    """Batch callable: ``anomaly_map`` -> ``map_png`` (bytes, None when no map), ``map_height``,
    ``map_width`` (0 when no map), ``mask_rle`` (JSON of a COCO RLE dict, None when no threshold or
    no map), ``threshold`` (the mask's threshold, None without a mask), ``encode_ms`` (NaN when no
    map). Rows without a map (failed, or no pixel method) pass through."""

    name = STAGE
    timed = True  # encode_ms; run.json's encode_busy
    section = "maps"
    kind = "task"
    requires = ("anomaly_map", "status")
    types = {"map_png": pa.binary(), "map_height": pa.int64(), "map_width": pa.int64(), "mask_rle": pa.string(),
             "threshold": pa.float64(), "encode_ms": pa.float64()}
    produces = tuple(types)
    drops = ("anomaly_map",)

    def __init__(self, map_range: tuple[float, float] = (0.0, 1.0), threshold: float | None = None) -> None:
        self.vmin, self.vmax = map_range
        self.threshold = threshold

    @classmethod
    def from_spec(cls, spec, storage=None) -> "EncodeStage":
        return cls(spec.map_range(), threshold=spec.maps.threshold)

    def setup(self) -> None:
        """Nothing to build."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        out = {k: v for k, v in batch.items() if k not in self.drops}
        png = object_column([None] * n)
        rles = object_column([None] * n)
        height = np.zeros(n, dtype=np.int64)
        width = np.zeros(n, dtype=np.int64)
        threshold = np.full(n, np.nan)
        ms = np.full(n, np.nan)

        def row(i: int) -> None:
            m = np.asarray(batch["anomaly_map"][i])
            m = m.reshape(m.shape[0], -1) if m.ndim == 2 else m
            png[i] = heatmap.encode_png16(m, self.vmin, self.vmax)
            height[i], width[i] = m.shape
            if self.threshold is not None:
                rles[i] = json.dumps(rle.encode(m >= self.threshold))
                threshold[i] = self.threshold

        each_row(batch["status"], row, ms=ms, skip=lambda i: np.asarray(batch["anomaly_map"][i]).size == 0)
        out.update(map_png=png, map_height=height, map_width=width, mask_rle=rles, threshold=threshold, encode_ms=ms)
        return out
