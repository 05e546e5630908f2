"""The CLIP backbone: the ``clip`` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import SpecModel, WeightsSpec

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ClipSpec(SpecModel):
    """The CLIP backbone. ``model``: an open_clip model name (``zsad-tiny`` is a tiny config zsad
    registers for tests and the offline demo). ``weights``: a weights spec, or ``null`` for random
    initialisation (needs top-level ``allow_random_weights: true``). ``image_size``: input side in
    pixels (default: the model's own). ``precision``: ``auto`` (default: fp32 on a CPU worker, bf16 on
    a GPU that supports it), ``fp32``, ``bf16`` or ``fp16`` (GPU only; a CPU worker runs fp32): the
    image tower's forward passes run under autocast in that precision with fp32 weights; text
    embeddings, similarities, logits and maps stay fp32 (:mod:`pipeline.models.precision`; the
    deviation per method is in BENCHMARKS.md).
    ``cpu_int8``: on CPU workers, quantise the vision tower's MLP linear layers to int8 (dynamic
    quantisation) for speed; scores and maps deviate slightly from fp32 (measured in BENCHMARKS.md).
    ``resize``: how an image is squashed to the model's input size(s), bicubic either way:
    ``torch`` (default; torch's antialiased bicubic on float pixels, as anomalib's WinCLIP) or
    ``pil`` (PIL's bicubic on the 8-bit image, rounded back to 8 bits, as torchvision's ``Resize``
    on a PIL image in FADE's data loader).
    ``activation``: the activation of every transformer MLP, ``quick_gelu`` or ``gelu``; ``null``
    (default) keeps the model's own. APRIL-GAN's released adapters were trained on ViT-L-14-336
    built with ``gelu`` although OpenAI's weights were trained with QuickGELU: ``gelu`` reproduces it.
    """

    model: str
    weights: WeightsSpec | None
    image_size: int | None = Field(default=None, ge=16)
    precision: Precision = "auto"
    cpu_int8: bool = False
    resize: Literal["torch", "pil"] = "torch"
    activation: Literal["quick_gelu", "gelu"] | None = None
