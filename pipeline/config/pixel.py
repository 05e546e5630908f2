"""The pixel maps: the ``pixel`` section, a union by ``kind``."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import SpecModel, WeightsSpec
from pipeline.config.score import Aggregation, PromptFileSpec, PromptSetName, check_wrapper


class NoPixelMap(SpecModel):
    """No pixel map: image-level scores only (no ``masks/`` rows are written)."""

    kind: Literal["none"] = "none"


class WinclipWindows(SpecModel):
    """WinCLIP zero-shot pixel map (METHODS.md section 3): windows of ``window_sizes`` patches at
    stride 1 scored with the image-level prompts (``score`` section), harmonic mean per patch,
    scales fused harmonically with the image score when ``fuse_image_score``."""

    kind: Literal["winclip_windows"] = "winclip_windows"
    window_sizes: tuple[int, ...] = (2, 3)
    fuse_image_score: bool = True

    @field_validator("window_sizes")
    @classmethod
    def _sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 1 for k in value):
            raise ValueError("window_sizes needs at least one size >= 1")
        return value


class FadeZeroShot(SpecModel):
    """FADE zero-shot maps (METHODS.md section 3): GEM language maps at ``scales`` (input sizes in
    pixels) averaged on a ``grid`` x ``grid`` map, the zero-shot vision map (2nd nearest neighbour
    among the image's own patches, 0.5 * (1 - cos), times ``vision_multiplier``), fused as
    (1 - ``vision_weight``) * language + ``vision_weight`` * vision, clipped to [0, 1].
    The language map uses ``prompt_sets`` and ``prompt_files`` (:class:`PromptFileSpec`; FADE's own
    LLM-written lists when the user has them) with the object name ``object_name``
    (object-agnostic), each sentence wrapped by ``wrapper`` when set (FADE: ``"a photo of a {}."``),
    text aggregation ``aggregation`` and ``temperature``; GEM runs on the last ``gem_depth`` blocks.
    ``vision_features``: the patch features of the vision map, ``gem`` (FADE's published zero-shot
    setting) or ``clip`` (the plain final patch tokens; FADE's few-shot setting)."""

    kind: Literal["fade_zero_shot"] = "fade_zero_shot"
    scales: tuple[int, ...] = (240, 448, 896)
    grid: int = Field(default=56, ge=1)
    gem_depth: int = Field(default=6, ge=1)
    vision_multiplier: float = Field(default=80.0, ge=0)
    vision_weight: float = Field(default=0.5, ge=0, le=1)
    vision_features: Literal["gem", "clip"] = "gem"
    prompt_sets: tuple[PromptSetName, ...] = ("winclip", "zsad_agnostic")
    prompt_files: tuple[PromptFileSpec, ...] = ()
    wrapper: str | None = None
    object_name: str = "object"
    aggregation: Aggregation = "mean_norm"
    temperature: float = Field(default=0.01, gt=0)

    @field_validator("wrapper")
    @classmethod
    def _wrapper(cls, value: str | None) -> str | None:
        return check_wrapper(value)

    @model_validator(mode="after")
    def _some_prompts(self) -> "FadeZeroShot":
        if not self.prompt_sets and not self.prompt_files:
            raise ValueError("pixel needs prompts: prompt_sets, prompt_files, or both")
        return self

    @field_validator("scales")
    @classmethod
    def _scales(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(s < 16 for s in value):
            raise ValueError("scales needs at least one input size >= 16 pixels")
        return value


class ClipSegMaps(SpecModel):
    """CLIPSeg pixel localiser (VVV, METHODS.md section 5): the transformers CLIPSeg model with the
    18 object-agnostic localising prompts (``prompts: null``) or a given list, per-prompt sigmoid
    maps combined by the harmonic mean. ``weights``: a weights spec for a CLIPSeg state-dict file
    (``rd64-refined`` architecture), or ``null`` for random initialisation (needs
    ``allow_random_weights: true``). Needs the optional extra ``pip install 'zsad[clipseg]'``."""

    kind: Literal["clipseg"] = "clipseg"
    arch: Literal["rd64-refined", "tiny"] = "rd64-refined"
    weights: WeightsSpec | None = None
    prompts: tuple[str, ...] | None = None


def block_numbers(value: tuple[int, ...]) -> tuple[int, ...]:
    """``layers`` of a pixel method: 1-indexed block numbers, increasing, without repeats."""
    if not value or any(v < 1 for v in value) or list(value) != sorted(set(value)):
        raise ValueError("layers needs block numbers >= 1 (1-indexed), increasing, without repeats")
    return value


class AprilGanAdapters(SpecModel):
    """APRIL-GAN adapter maps (METHODS.md section 3): the raw residual outputs of blocks ``layers``
    (1-indexed, class token dropped) at an input of ``image_size`` pixels, one trained linear adapter
    per layer into the joint space, softmax(100 * cos) against the image score's two text vectors
    (the ``score`` section: APRIL-GAN uses the same text for both) after bilinear upsampling to the
    map size; the map is the SUM over the layers, stored on the fixed range [0, len(layers)]. The
    image score uses the class embedding of the same forward pass (at ``image_size``).
    ``weights``: the adapters, a weights spec for zsad's safetensors file (``zsad train``) or the
    authors' released ``.pth`` (``mvtec_pretrained.pth``, ``visa_pretrained.pth``); ``null`` is
    random initialisation (needs ``allow_random_weights: true``)."""

    kind: Literal["april_gan"] = "april_gan"
    layers: tuple[int, ...] = (6, 12, 18, 24)
    image_size: int = Field(default=518, ge=16)
    weights: WeightsSpec | None = None

    _layers = field_validator("layers")(classmethod(lambda cls, value: block_numbers(value)))


class MutualMaps(SpecModel):
    """MuSc's mutual maps (MUSC.md sections 1-4; settings of the scoring in the ``mutual`` section):
    the raw residual-stream outputs of blocks ``layers`` (1-indexed, class token dropped, before
    ln_post) at an input of ``image_size`` pixels (a multiple of the patch size; squashed), each
    block's token map standardised as a whole, averaged over r x r neighbourhoods for r in
    ``degrees`` and L2-normalised; each patch is scored by its distance to the nearest patch of the
    other images of its category's pool (``mutual.pool_size``). The map (distances on unit vectors)
    is stored on [0, 2]."""

    kind: Literal["mutual"] = "mutual"
    layers: tuple[int, ...] = (6, 12, 18, 24)
    image_size: int = Field(default=518, ge=16)
    degrees: tuple[int, ...] = (1, 3, 5)

    _layers = field_validator("layers")(classmethod(lambda cls, value: block_numbers(value)))

    @field_validator("degrees")
    @classmethod
    def _degrees(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(r < 1 or r % 2 == 0 for r in value) or len(set(value)) != len(value):
            raise ValueError("degrees needs odd neighbourhood sizes >= 1 without repeats (MuSc: 1, 3, 5)")
        return value


PixelSpec = Annotated[Union[NoPixelMap, WinclipWindows, FadeZeroShot, ClipSegMaps, AprilGanAdapters, MutualMaps],
                      Field(discriminator="kind")]
