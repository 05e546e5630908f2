"""Encode stage (CPU): float anomaly maps -> 16-bit PNG on the method's fixed range + COCO RLE mask.

Quantising every map of a run on the same fixed range (``[0, 1]`` for probability maps) puts them
on one grid of 65536 levels, so evaluation from stored maps is exact. The float map column is
dropped here, so only compact bytes travel on.
"""

from __future__ import annotations

import json
import time

import numpy as np

from pipeline.ops import heatmap, rle
from pipeline.stages._columns import check_columns

STAGE = "encode"


class EncodeStage:
    """Batch callable: ``anomaly_map`` -> ``map_png`` (bytes, b"" when no map), ``map_height``,
    ``map_width`` (0 when no map), ``mask_rle`` (JSON of a COCO RLE dict, "" when no threshold or
    no map), ``encode_ms``. Rows without a map (failed, or no pixel method) pass through."""

    name = STAGE
    requires = ("anomaly_map", "status")
    produces = ("map_png", "map_height", "map_width", "mask_rle", "encode_ms")

    def __init__(self, map_range: tuple[float, float] = (0.0, 1.0), threshold: float | None = None) -> None:
        self.vmin, self.vmax = map_range
        self.threshold = threshold

    def setup(self) -> None:
        """Nothing to build."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        out = {k: v for k, v in batch.items() if k != "anomaly_map"}
        png = np.empty(n, dtype=object)
        png[:] = [b""] * n
        rles = np.empty(n, dtype=object)
        rles[:] = [""] * n
        height = np.zeros(n, dtype=np.int64)
        width = np.zeros(n, dtype=np.int64)
        ms = np.zeros(n, dtype=np.float64)
        for i in range(n):
            m = np.asarray(batch["anomaly_map"][i])
            if batch["status"][i] != "ok" or m.size == 0:
                continue
            t0 = time.perf_counter()
            m = m.reshape(m.shape[0], -1) if m.ndim == 2 else m
            png[i] = heatmap.encode_png16(m, self.vmin, self.vmax)
            height[i], width[i] = m.shape
            if self.threshold is not None:
                rles[i] = json.dumps(rle.encode(m >= self.threshold))
            ms[i] = (time.perf_counter() - t0) * 1000.0
        out.update(map_png=png, map_height=height, map_width=width, mask_rle=rles, encode_ms=ms)
        return out
