"""What a run writes besides its tables' rows: the ``maps`` and ``report`` sections."""

from __future__ import annotations

import math
from typing import Literal, Union

from pydantic import Field, field_validator

from pipeline.config.base import SpecModel


class MapOutputSpec(SpecModel):
    """How pixel maps are stored in ``masks/``. ``map_size``: ``original`` (the decoded image's size)
    or the long side in pixels (aspect kept; default 256, enough for evaluation at the papers'
    resolution while keeping the table small). ``threshold``: when set, a binary mask (map >=
    threshold) is stored as COCO RLE."""

    map_size: Union[Literal["original"], int] = 256
    threshold: float | None = Field(default=None, ge=0, le=1)

    @field_validator("map_size")
    @classmethod
    def _size(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("map_size must be 'original' or a positive long side in pixels")
        return value


class ReportSpec(SpecModel):
    """The HTML report ``zsad run`` writes at the end of a run (``RUN/report.html``, also for a
    failed run; ``zsad report RUN`` writes it again). ``enabled``: false to skip it; ``top``: images
    shown per category, most anomalous and again nearest the threshold; ``map_range``: the heatmap
    colour scale shared by every image of the page: ``auto`` (0.5th-99.9th percentile of the shown
    maps' pixels), ``stored`` (the maps' stored range) or ``LO,HI``."""

    enabled: bool = True
    top: int = Field(default=6, ge=1, le=200)
    map_range: str = "auto"

    @field_validator("map_range")
    @classmethod
    def _range(cls, value: str) -> str:
        if value in ("auto", "stored"):
            return value
        try:
            lo, hi = (float(v) for v in value.split(","))
        except ValueError:
            raise ValueError(f"{value!r}: use auto, stored or LO,HI (two numbers, LO < HI)") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"{value!r}: LO,HI must be finite numbers with LO < HI")
        return value
