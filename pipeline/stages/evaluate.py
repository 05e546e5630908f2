"""Evaluation stage (CPU): stored heatmaps + ground-truth masks -> per-category partial statistics.

Each input row is one ``masks`` row joined with its ground truth (``gt_label``, ``mask_uri``). The
16-bit PNG levels ARE the quantised map, so the per-level statistics are exact. By default the map
is evaluated at its stored size and the mask is resized to it with nearest-neighbour; with
``eval_size`` = N both are brought to long side N (map: bilinear on values, then re-quantised to the
same 65536-level grid; mask: nearest) - the identical geometric transform.

Output: one row per category present in the batch with the serialised :class:`LevelStats`
(``neg``, ``pos`` int64 and ``pro`` float64 as bytes, ``n_regions``) and per-image problems
(anomalous images whose mask is missing or unreadable are reported, never treated as normal).
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from pipeline.io.fs import StorageOptions, read_bytes
from pipeline.metrics.state import LEVELS, LevelStats
from pipeline.ops import heatmap
from pipeline.stages.base import check_columns

STAGE = "evaluate"


def read_mask(uri: str, storage: StorageOptions | None) -> np.ndarray:
    """A ground-truth mask as bool (H, W): any non-zero pixel is anomalous (class-index masks too)."""
    with Image.open(io.BytesIO(read_bytes(uri, storage))) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    return arr != 0


def long_side(shape: tuple[int, int], n: int) -> tuple[int, int]:
    scale = n / max(shape)
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


class EvaluateStage:
    """Batch callable; see the module docstring."""

    name = STAGE
    requires = ("image_id", "category", "status", "map_png", "gt_label", "mask_uri")

    def __init__(self, eval_size: str | int = "stored", storage: StorageOptions | None = None) -> None:
        self.eval_size = eval_size
        self.storage = storage

    def setup(self) -> None:
        """Nothing to build."""

    def image_stats(self, png: bytes, gt_label, mask_uri) -> tuple[np.ndarray, np.ndarray]:
        """(levels (H, W) int64, mask (H, W) bool) for one image at the evaluation size."""
        levels = heatmap.decode_png16_levels(png)
        if self.eval_size not in ("stored", None):
            shape = long_side(levels.shape, int(self.eval_size))
            values = heatmap.resize_map(levels.astype(np.float64) / (LEVELS - 1), shape)
            levels = heatmap.quantise(values, 0.0, 1.0)
        if gt_label == 1:
            if not mask_uri:
                raise FileNotFoundError("anomalous image without a ground-truth mask")
            mask = heatmap.resize_nearest(read_mask(mask_uri, self.storage), levels.shape)
        else:
            mask = np.zeros(levels.shape, dtype=bool)
        return levels.astype(np.int64), mask

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        stats: dict[str, LevelStats] = {}
        problems: dict[str, list[str]] = {}
        t0 = time.perf_counter()
        for i in range(n):
            cat = str(batch["category"][i])
            label = batch["gt_label"][i]
            label = None if label is None or (isinstance(label, float) and np.isnan(label)) else int(label)
            if batch["status"][i] != "ok" or label is None:
                continue
            try:
                levels, mask = self.image_stats(batch["map_png"][i], label, batch["mask_uri"][i])
            except Exception as exc:  # reported per image, never silently treated as normal
                problems.setdefault(cat, []).append(f"{batch['image_id'][i]}: {type(exc).__name__}: {exc}")
                continue
            stats.setdefault(cat, LevelStats()).add(levels, mask)
        cats = sorted(set(stats) | set(problems))
        empty = LevelStats()
        out_stats = [stats.get(c, empty) for c in cats]
        return {
            "category": np.array(cats, dtype=object),
            "neg": np.array([s.neg.tobytes() for s in out_stats], dtype=object),
            "pos": np.array([s.pos.tobytes() for s in out_stats], dtype=object),
            "pro": np.array([s.pro.tobytes() for s in out_stats], dtype=object),
            "n_regions": np.array([s.n_regions for s in out_stats], dtype=np.int64),
            "problems": np.array(["\n".join(problems.get(c, [])) for c in cats], dtype=object),
            "evaluate_ms": np.full(len(cats), (time.perf_counter() - t0) * 1000.0),
        }


def stats_from_row(neg: bytes, pos: bytes, pro: bytes, n_regions: int) -> LevelStats:
    return LevelStats(
        np.frombuffer(neg, dtype=np.int64).copy(),
        np.frombuffer(pos, dtype=np.int64).copy(),
        np.frombuffer(pro, dtype=np.float64).copy(),
        int(n_regions),
    )
