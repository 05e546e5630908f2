"""Aggregation stage (CPU): tile scores and tile maps -> image score and image map (METHODS.md
section 5), with :func:`pipeline.ops.aggregate.aggregate_tiles`:

- each tile's pixel map is scaled by its tile score, pasted back into image space, and pixels
  covered by several tiles are averaged;
- a component's score is the mean of its tiles' scores; the image score is the mean of the top
  ``aggregation.top_fraction`` of component scores.

Columns: ``score`` (and ``score_language``: tiles are scored from text) is replaced by the
aggregated image score; ``anomaly_map`` (float32 at the stored map size, see ``maps.map_size``) and
``max_pixel_score`` by the aggregated map (``score_vision``, the largest tile vision score, was set
by the CLIP stage). New: ``n_components`` (int64: components scored, 0 for the fallback),
``n_tiles`` (int64), ``scoring_mode`` (``tiles``, or ``whole_image_fallback`` for an image without
foreground, scored whole; None for failed rows), ``tile_component_scores`` (float64 (T,): the score
of each tile's component), ``aggregate_ms``. ``tile_maps`` is dropped here.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.config import AggregationSpec, MapOutputSpec
from pipeline.ops.aggregate import aggregate_tiles
from pipeline.ops.heatmap import PROBABILITY_RANGE, map_shape, resize_map
from pipeline.ops.tiling import Tile
from pipeline.stages.base import check_columns
from pipeline.stages.records import TENSOR, TILE_CODEC, each_row, object_column

STAGE = "aggregate"


class AggregateStage:
    """Batch callable; see the module docstring."""

    name = STAGE
    timed = True  # aggregate_ms; run.json's aggregate_busy
    section = "aggregation"
    kind = "task"
    requires = ("tiles", "tile_reasons", "tile_scores", "tile_maps", "height", "width", "status")
    types = {"score": pa.float64(), "score_language": pa.float64(), "anomaly_map": TENSOR,
             "max_pixel_score": pa.float64(), "n_components": pa.int64(), "n_tiles": pa.int64(),
             "scoring_mode": pa.string(), "tile_component_scores": pa.list_(pa.float64()), "aggregate_ms": pa.float64()}
    produces = tuple(types)
    drops = ("tile_maps",)

    def __init__(self, cfg: AggregationSpec, maps: MapOutputSpec) -> None:
        self.cfg = cfg
        self.maps = maps

    @classmethod
    def from_spec(cls, spec, storage=None) -> "AggregateStage | None":
        return cls(spec.aggregation, spec.maps) if spec.tiling is not None else None

    def setup(self) -> None:
        """Nothing to build."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        out = {k: v for k, v in batch.items() if k not in self.drops}
        score = np.array(batch.get("score", np.full(n, np.nan)), dtype=np.float64)
        max_pixel = np.array(batch.get("max_pixel_score", np.full(n, np.nan)), dtype=np.float64)
        maps = object_column([np.zeros((0, 0), np.float32)] * n)
        n_comp = np.zeros(n, dtype=np.int64)
        n_tiles = object_column([None] * n)
        mode = object_column([None] * n)
        comp_scores = object_column([np.zeros(0, np.float64) for _ in range(n)])
        ms = np.full(n, np.nan)

        def row(i: int) -> None:
            boxes = TILE_CODEC.table(batch["tiles"][i])
            tiles = [Tile(component_id=int(b[0]), box=(int(b[1]), int(b[2]), int(b[3]), int(b[4])), reason=str(r))
                     for b, r in zip(boxes, batch["tile_reasons"][i])]
            t_scores = np.asarray(batch["tile_scores"][i], dtype=np.float64)
            t_maps = np.asarray(batch["tile_maps"][i])
            h, w = int(batch["height"][i]), int(batch["width"][i])
            result = aggregate_tiles((h, w), tiles, t_scores, list(t_maps) if t_maps.size else None,
                                     top_fraction=self.cfg.top_fraction)
            score[i] = result.image_score
            comp_scores[i] = np.array([result.component_scores[t.component_id] for t in tiles], dtype=np.float64)
            n_tiles[i] = len(tiles)
            whole = all(t.component_id < 0 for t in tiles)
            n_comp[i] = 0 if whole else len(result.component_scores)
            mode[i] = "whole_image_fallback" if whole else "tiles"
            if result.image_map is not None:
                full = np.clip(result.image_map, *PROBABILITY_RANGE).astype(np.float32)
                maps[i] = resize_map(full, map_shape(h, w, self.maps.map_size)).astype(np.float32)
                max_pixel[i] = float(maps[i].max())

        each_row(batch["status"], row, ms=ms)
        out.update(score=score, score_language=score.copy(), anomaly_map=maps, max_pixel_score=max_pixel,
                   n_components=n_comp, n_tiles=n_tiles,
                   scoring_mode=mode, tile_component_scores=comp_scores, aggregate_ms=ms)
        return out
