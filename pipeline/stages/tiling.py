"""Tiling stage (CPU): foreground components -> a tiling plan per image (METHODS.md section 5).

The plan itself is the pure function :func:`pipeline.ops.tiling.plan_tiles`. Tiles stay a column
of the image's row (one row per image through the whole pipeline):

================  ==========  ==============================================================
``tiles``         object      int64 (T, 5): component_id, x0, y0, x1, y1 (original pixels,
                              x1/y1 exclusive); component_id -1 = the whole-image fallback
``tile_reasons``  object      the T reasons, comma-separated (``component``, ``elongated``,
                              ``clipped`` ..., ``whole_image``)
================  ==========  ==============================================================

An image without foreground components gets one whole-image tile (its score is then the plain
whole-image score, and the scores table says so in ``scoring_mode``).
"""

from __future__ import annotations

import numpy as np

from pipeline.config import TilingSpec
from pipeline.models.foreground import Component
from pipeline.ops.tiling import plan_tiles
from pipeline.stages._columns import check_columns

STAGE = "tiling"


def components_from_table(table: np.ndarray) -> list[Component]:
    """The foreground stage's (C, 7) component table -> :class:`Component` objects."""
    table = np.asarray(table, dtype=np.int64).reshape(-1, 7)
    return [Component(id=int(r[0]), box=(int(r[1]), int(r[2]), int(r[3]), int(r[4])), area=int(r[5]), n_parts=int(r[6]))
            for r in table]


class TilingStage:
    """Batch callable; see the module docstring."""

    name = STAGE
    requires = ("fg_components", "height", "width", "status")
    produces = ("tiles", "tile_reasons")

    def __init__(self, cfg: TilingSpec) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        """Nothing to build."""

    def plan(self, components: np.ndarray, height: int, width: int):
        return plan_tiles(components_from_table(components), (int(height), int(width)), min_tile=self.cfg.min_tile,
                          elongated_aspect=self.cfg.elongated_aspect, elongated_min_parts=self.cfg.elongated_min_parts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        out = dict(batch)
        tiles = np.empty(n, dtype=object)
        tiles[:] = [np.zeros((0, 5), np.int64) for _ in range(n)]
        reasons = np.empty(n, dtype=object)
        reasons[:] = [""] * n
        for i in range(n):
            if batch["status"][i] != "ok":
                continue
            plan = self.plan(batch["fg_components"][i], batch["height"][i], batch["width"][i])
            tiles[i] = np.array([[t.component_id, *t.box] for t in plan], dtype=np.int64).reshape(-1, 5)
            reasons[i] = ",".join(t.reason for t in plan)
        out.update(tiles=tiles, tile_reasons=reasons)
        return out
