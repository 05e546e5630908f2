"""Tiling stage (CPU): foreground components -> a tiling plan per image (METHODS.md section 5).

The plan itself is the pure function :func:`pipeline.ops.tiling.plan_tiles`. Tiles stay a column
of the image's row (one row per image through the whole pipeline):

================  ==========  ==============================================================
``tiles``         TILES       int64 (T, 5): component_id, x0, y0, x1, y1 (original pixels,
                              x1/y1 exclusive); component_id -1 = the whole-image fallback
                              (in flight: ``list<struct>``, :data:`~pipeline.stages.records.TILES`)
``tile_reasons``  list<str>   the T reasons (``component``, ``elongated``, ``clipped`` ...,
                              ``whole_image``)
================  ==========  ==============================================================

An image without foreground components gets one whole-image tile (its score is then the plain
whole-image score, and the scores table says so in ``scoring_mode``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.config import TilingSpec
from pipeline.ops.foreground import Component
from pipeline.ops.tiling import plan_tiles
from pipeline.stages.base import check_columns
from pipeline.stages.records import COMPONENT_CODEC, TILE_CODEC, TILES, each_row, object_column

STAGE = "tiling"


def components_from_table(table: np.ndarray) -> list[Component]:
    """The foreground stage's component table (:data:`~pipeline.stages.records.COMPONENT_FIELDS`)
    -> :class:`Component` objects."""
    return [Component(id=int(r[0]), box=(int(r[1]), int(r[2]), int(r[3]), int(r[4])), area=int(r[5]), n_parts=int(r[6]))
            for r in COMPONENT_CODEC.table(table)]


class TilingStage:
    """Batch callable; see the module docstring."""

    name = STAGE
    section = "tiling"
    kind = "task"
    requires = ("fg_components", "height", "width", "status")
    types = {"tiles": TILES, "tile_reasons": pa.list_(pa.string())}
    produces = tuple(types)
    drops: tuple[str, ...] = ()

    def __init__(self, cfg: TilingSpec) -> None:
        self.cfg = cfg

    @classmethod
    def from_spec(cls, spec, storage=None) -> "TilingStage | None":
        return cls(spec.tiling) if spec.tiling is not None else None

    def setup(self) -> None:
        """Nothing to build."""

    def plan(self, components: np.ndarray, height: int, width: int):
        return plan_tiles(components_from_table(components), (int(height), int(width)), min_tile=self.cfg.min_tile,
                          elongated_aspect=self.cfg.elongated_aspect, elongated_min_parts=self.cfg.elongated_min_parts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        out = dict(batch)
        tiles = object_column([TILE_CODEC.table(None) for _ in range(n)])
        reasons = object_column([[] for _ in range(n)])

        def row(i: int) -> None:
            plan = self.plan(batch["fg_components"][i], batch["height"][i], batch["width"][i])
            tiles[i] = TILE_CODEC.table([[t.component_id, *t.box] for t in plan])
            reasons[i] = [t.reason for t in plan]

        each_row(batch["status"], row)
        out.update(tiles=tiles, tile_reasons=reasons)
        return out
