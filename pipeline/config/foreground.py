"""Foreground, instance tiling and tile aggregation: the ``foreground``, ``tiling`` and ``aggregation``
sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import SpecModel, WeightsSpec


class ForegroundSpec(SpecModel):
    """Foreground extraction (METHODS.md section 5). ``kind``:

    - ``sam_dis`` (default): SAM automatic masks (a ``points_per_side`` grid of point prompts),
      a mask kept when at least ``min_inside`` of it lies inside the foreground-probability map
      (``>= prob_threshold``); the union of kept masks is the foreground. The map comes from the
      dichotomous segmentation model ``dis_model`` (an ONNX file, run with onnxruntime) or, when
      that is ``null``, from the classical map (below).
    - ``classical``: the classical map alone, no SAM: a background colour model from the image
      border, distance to it, morphology (``pipeline/ops/foreground.py``).
    - ``none``: no foreground; every image is scored whole.

    Connected components of the foreground smaller than ``min_component_fraction`` of the image
    are dropped."""

    kind: Literal["sam_dis", "classical", "none"] = "sam_dis"
    dis_model: WeightsSpec | None = None
    dis_input_size: int = Field(default=1024, ge=16)
    min_inside: float = Field(default=0.8, gt=0, le=1)
    prob_threshold: float = Field(default=0.5, gt=0, lt=1)
    min_component_fraction: float = Field(default=0.001, ge=0, lt=1)
    points_per_side: int = Field(default=32, ge=1)
    points_per_batch: int = Field(default=64, ge=1)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)
    box_nms_thresh: float = Field(default=0.7, gt=0, le=1)
    border: float = Field(default=0.05, gt=0, lt=0.5)


class TilingSpec(SpecModel):
    """Instance tiling (METHODS.md section 5): a square tile centred on each foreground component,
    side at least ``min_tile`` pixels (clipped to the image); a component whose box aspect ratio
    exceeds ``elongated_aspect`` and that holds more than ``elongated_min_parts`` SAM parts is tiled
    along its long axis with a step of half its short side. ``write_table``: write ``tiles/``.
    Tiles are scored by the CLIP stage at ``tile_map_size`` (pixel maps per tile, square)."""

    min_tile: int = Field(default=352, ge=16)
    elongated_aspect: float = Field(default=1.5, ge=1)
    elongated_min_parts: int = Field(default=20, ge=0)
    write_table: bool = True
    tile_map_size: int = Field(default=240, ge=8)


class AggregationSpec(SpecModel):
    """Tile aggregation (METHODS.md section 5): tile maps scaled by their tile score, pasted back,
    overlaps averaged; component score = mean of its tiles' scores; image score = mean of the top
    ``top_fraction`` of component scores (at least one)."""

    top_fraction: float = Field(default=0.25, gt=0, le=1)
