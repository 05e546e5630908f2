"""Tile scores and tile maps back to image level (METHODS.md section 5, VVV): the pure inverse of the
tiling plan (``pipeline.ops.tiling``).

Conventions
-----------
- Tile boxes are ``(x0, y0, x1, y1)`` integers in image pixels, ``x`` = column, ``y`` = row,
  ``x1``/``y1`` EXCLUSIVE: a tile covers ``image[y0:y1, x0:x1]``, a ``(y1 - y0, x1 - x0)`` region.
- Maps are indexed ``[row, col]``; ``image_hw = (H, W)``.

Rules
-----
- Pixel map: each tile map ``(h_i, w_i)`` is resized to its box size ``(y1 - y0, x1 - x0)`` when
  it differs, by bilinear interpolation with aligned pixel centres (``pipeline.ops.heatmap.resize_map``:
  torch's ``interpolate(mode="bilinear", align_corners=False)``, values beyond the outer pixel
  centres clamped to the edge), multiplied by its tile's score and pasted into image space. A pixel
  covered by several tiles gets the MEAN of the covering tiles' values; a pixel covered by no tile
  gets 0 (no evidence of an anomaly there: with the foreground tiling these are background pixels).
- Component score: the mean of the scores of its tiles (tiles grouped by ``component_id``; the
  whole-image fallback tile, id -1, is its own group).
- Image score: the mean of the top ``k = max(1, ceil(top_fraction * n))`` component scores, ``n`` the
  number of components (default 25%: robust for images holding several instances, one of them
  defective).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.ops.heatmap import resize_map
from pipeline.ops.tiling import Tile

__all__ = ["AggregateResult", "aggregate_tiles", "top_k"]


@dataclass
class AggregateResult:
    """``image_map``: float32 ``(H, W)`` (None when no tile maps were given); ``component_scores``:
    ``{component_id: mean tile score}`` in ascending id order; ``image_score``: top-fraction mean."""

    image_map: np.ndarray | None
    component_scores: dict[int, float]
    image_score: float


def top_k(n: int, top_fraction: float) -> int:
    """``max(1, ceil(top_fraction * n))``, robust to float error (``ceil(0.1 * 30)`` is 3, not 4)."""
    return max(1, math.ceil(top_fraction * n - 1e-9))


def aggregate_tiles(
    image_hw: tuple[int, int],
    tiles: Sequence[Tile],
    tile_scores: np.ndarray,
    tile_maps: Sequence[np.ndarray] | None = None,
    *,
    top_fraction: float = 0.25,
) -> AggregateResult:
    """Aggregate ``T`` tiles of an ``image_hw = (H, W)`` image.

    ``tiles``: the plan (non-empty, boxes inside the image); ``tile_scores``: ``(T,)`` finite tile
    anomaly scores; ``tile_maps``: None or ``T`` finite 2-D maps, ``tile_maps[i]`` of any size
    ``(h_i, w_i)`` (resized to tile ``i``'s box); ``top_fraction`` in (0, 1]. Rules in the module
    docstring. Raises ValueError naming the offending argument.
    """
    h, w = _check_hw(image_hw)
    tiles = list(tiles)
    if not tiles:
        raise ValueError("tiles must not be empty (plan_tiles always returns at least one tile)")
    boxes = [_check_tile(i, tile, h, w) for i, tile in enumerate(tiles)]
    scores = np.asarray(tile_scores)
    numeric = np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
    if scores.dtype == bool or not numeric:
        raise ValueError(f"tile_scores must be numeric, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if scores.shape != (len(tiles),):
        raise ValueError(f"tile_scores must have shape (T,) = ({len(tiles)},) to match tiles, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"tile_scores must be finite: {int(np.count_nonzero(~np.isfinite(scores)))} NaN/inf entries")
    try:
        fraction = float(top_fraction)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"top_fraction must be a number in (0, 1], got {top_fraction!r}") from exc
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}")

    image_map = None
    if tile_maps is not None:
        maps = list(tile_maps)
        if len(maps) != len(tiles):
            raise ValueError(f"tile_maps has {len(maps)} maps for {len(tiles)} tiles; they must match")
        total = np.zeros((h, w), np.float64)
        count = np.zeros((h, w), np.int64)
        for i, ((x0, y0, x1, y1), tile_map, score) in enumerate(zip(boxes, maps, scores)):
            arr = _check_map(i, tile_map)
            if arr.shape != (y1 - y0, x1 - x0):
                arr = resize_map(arr, (y1 - y0, x1 - x0))
            total[y0:y1, x0:x1] += arr * score
            count[y0:y1, x0:x1] += 1
        image_map = np.divide(total, count, out=np.zeros_like(total), where=count > 0).astype(np.float32)

    grouped: dict[int, list[float]] = {}
    for tile, score in zip(tiles, scores):
        grouped.setdefault(int(tile.component_id), []).append(float(score))
    component_scores = {cid: float(np.mean(grouped[cid])) for cid in sorted(grouped)}
    ranked = sorted(component_scores.values(), reverse=True)
    k = top_k(len(ranked), fraction)
    image_score = float(np.mean(ranked[:k]))
    return AggregateResult(image_map=image_map, component_scores=component_scores, image_score=image_score)


def _check_hw(image_hw: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = image_hw
        if isinstance(h, bool) or isinstance(w, bool):
            raise TypeError
        h, w = int(h), int(w)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"image_hw must be (H, W), got {image_hw!r}") from exc
    if (h, w) != tuple(image_hw) or h < 1 or w < 1:
        raise ValueError(f"image_hw must be two positive integers, got {image_hw!r}")
    return h, w


def _check_tile(i: int, tile: Tile, h: int, w: int) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in tile.box)
        int(tile.component_id)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"tiles[{i}] must be a Tile with component_id and box (x0, y0, x1, y1), got {tile!r}") from exc
    if len(box) != 4:
        raise ValueError(f"tiles[{i}].box must be (x0, y0, x1, y1), got {tile.box!r}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"tiles[{i}].box {box} must be non-empty and inside the image (W={w}, H={h}; x1/y1 exclusive)")
    return x0, y0, x1, y1


def _check_map(i: int, tile_map: np.ndarray) -> np.ndarray:
    arr = np.asarray(tile_map)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"tile_maps[{i}] must be a non-empty 2-D (h, w) map, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"tile_maps[{i}] must be numeric, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"tile_maps[{i}] must be finite: {int(np.count_nonzero(~np.isfinite(arr)))} NaN/inf entries")
    return arr.astype(np.float64)
