"""Segment Anything and the CLIP-SAM refinement: the ``sam`` and ``sam_refine`` sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.base import SpecModel, WeightsSpec
from pipeline.config.clip import Precision


class SamSpec(SpecModel):
    """Segment Anything (METHODS.md sections 5-6). ``model``: ``vit_h``, ``vit_l``, ``vit_b`` or
    ``tiny`` (a small SAM assembled from segment-anything's modules, for tests). ``weights``: a
    checkpoint path or URI (SAM has no pretrained tags), or ``null`` for random initialisation
    (needs ``allow_random_weights: true``). ``cpu_allocator``: on a worker where SAM runs on the
    CPU, ``keep_freed`` (default) makes glibc keep freed memory in the process
    (:func:`pipeline.models.sam.keep_freed_memory`): SAM runs faster (vit_b's encoder 1.9x; with
    smaller point batches, the automatic masks' decoder 3.5x) and the worker's resident size is
    higher (BENCHMARKS.md); ``default`` leaves glibc's settings. GPU workers are not changed.
    ``precision``: as ``clip.precision``, for SAM's image encoder (the prompt and mask decoders,
    a small part of the work, stay fp32, so masks are thresholded from fp32 logits)."""

    model: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_b"
    weights: WeightsSpec | None = None
    cpu_allocator: Literal["keep_freed", "default"] = "keep_freed"
    precision: Precision = "auto"

    @field_validator("weights")
    @classmethod
    def _no_tag(cls, value: WeightsSpec | None) -> WeightsSpec | None:
        if value is not None and value.tag:
            raise ValueError(f"SAM weights need a checkpoint path or URI; {value.tag!r} looks like a pretrained tag")
        return value


class SamRefineSpec(SpecModel):
    """SAM refinement, the CLIP-SAM prompt cascade (METHODS.md section 6), on each image's CLIP map
    brought to the image's resolution. SAM (the ``sam`` section) embeds the image once.

    - Extreme region R: ``threshold_mode`` ``fraction`` (map >= ``threshold`` x the image's max, the
      default 0.8), ``absolute`` (map >= ``threshold``) or ``quantile`` (map >= that quantile).
    - Positive points: the ``positive_points`` highest map values in R, at least ``min_distance``
      pixels apart (``squared_distance: true`` compares squared distances: the paper's "400 pixels"
      read as 20^2).
    - Negative points: in the ring dilate(R) - R (elliptical ``ring_kernel`` x ``ring_kernel``), the
      ``negative_points`` pixels whose SAM features are least similar to R's pooled feature.
    - ``steps``: 1 (points), 2 (+ the step-1 logits), 3 (+ the box of mask 2): the paper's ablation.
    - ``combine`` makes the final map from the refined mask M and the CLIP map C (range [lo, hi]):
      ``max`` (default: max(C, hi x M): refined pixels rank first, the CLIP order stays elsewhere so
      pixel AUROC keeps its meaning), ``replace`` (hi x M, lo elsewhere), ``blend``
      ((1 - ``blend_weight``) C + ``blend_weight`` hi x M) or ``gate`` (C inside M, lo outside).
    - ``score_gate``: images whose score is below it keep their CLIP map (not refined), as do images
      without a region; ``refined`` is false and ``refine_info`` says why.
    - ``multimask`` (default true): steps 2 and 3 take SAM's three masks and keep the highest
      predicted IoU (the paper's "highest-scored mask"); false: SAM's single-mask output there.
    - ``geometry``: where ``ring_kernel`` and ``min_distance`` are measured. ``sam_input``
      (default): in pixels of SAM's input (the image scaled so its long side is 1024), so the ring
      and the spacing cover the same part of any image whatever its resolution; ``image``: in the
      image's own pixels (before issue 29). ``refine_info`` records the pixel values used."""

    threshold_mode: Literal["absolute", "fraction", "quantile"] = "fraction"
    threshold: float = Field(default=0.8, ge=0)
    positive_points: int = Field(default=5, ge=1)
    negative_points: int = Field(default=5, ge=0)
    min_distance: float = Field(default=20.0, ge=0)
    squared_distance: bool = False
    ring_kernel: int = Field(default=25, ge=3)
    steps: Literal[1, 2, 3] = 3
    combine: Literal["max", "replace", "blend", "gate"] = "max"
    blend_weight: float = Field(default=0.5, ge=0, le=1)
    score_gate: float | None = None
    multimask: bool = True
    geometry: Literal["sam_input", "image"] = "sam_input"

    @field_validator("ring_kernel")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("ring_kernel must be odd (an elliptical kernel has a centre pixel)")
        return value
