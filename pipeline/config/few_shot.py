"""Few-shot scoring: the ``few_shot`` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import SpecModel

#: few_shot.method -> the pixel.kind whose zero-shot map it completes (METHODS.md section 4)
FEW_SHOT_PIXEL = {"winclip": "winclip_windows", "april_gan": "april_gan", "fade": "fade_zero_shot"}


class FewShotSpec(SpecModel):
    """Few-shot scoring (METHODS.md section 4): ``k`` normal reference images per category, a memory
    bank of their features per category built once per run (``RUN/banks/``), and the method's
    nearest-neighbour vision map added to its zero-shot map.

    ``reference``: the reference images (``--reference`` overrides it): a folder with one
    sub-folder per category, an mvtec/visa/visa_1cls/mpdd/btad root (its train split's normal
    images) or a manifest (.csv/.parquet with ``uri``, ``category``); ``layout`` as for inputs
    (``auto`` detects). ``k`` images per category are chosen with ``seed``, without replacement
    unless ``with_replacement`` (APRIL-GAN's sampler draws with replacement); the choice is written
    to ``RUN/references.parquet``. ``missing``: a category of the input without references is an
    ``error`` (the run stops before scoring, naming them) or is scored ``zero_shot`` (its rows say
    so: ``few_shot_k`` 0). ``method``: ``winclip`` (WinCLIP+), ``april_gan`` or ``fade``; it must
    match ``pixel.kind`` (winclip_windows, april_gan, fade_zero_shot) and defaults to it.
    FADE only: ``vision_multiplier`` (3.5), ``vision_weight`` (0.85, the weight of the vision map
    in the fused map) and ``vision_features`` (``clip``: the final patch tokens, FADE's few-shot
    recipe; ``gem``: the GEM stream's), at ``pixel.scales``. ``query_chunk``/``bank_chunk``:
    rows per block of the exact nearest-neighbour search (memory per block = their product x 4
    bytes). ``max_cached_banks``: banks a scoring actor keeps in memory at once (least recently
    used go first).

    ``sampler``: how the references are drawn. ``numpy`` (default): per category its own numpy
    generator seeded from (``seed``, the category's name), so a category's choice does not depend
    on the others. ``torch_randint``: what ``torch.manual_seed(seed)`` then ``torch.randint(0, n,
    (k,))`` per category gives, one stream over the categories in alphabetical order, each
    category's candidates sorted by URI (APRIL-GAN's reference draw; with replacement, seed in
    [0, 2^32)). APRIL-GAN's test.py draws after building its models, which consumes its global
    generator first, so its own k_shot.txt can differ from this draw on the same seed.
    ``torch_shuffle``: per category, the first ``k`` images of what a shuffling torch DataLoader
    yields after ``torch.manual_seed(seed)``, candidates sorted by URI (FADE's reference draw,
    without replacement; seed in [0, 2^64))."""

    reference: str | None = None
    layout: Literal["auto", "folder", "mvtec", "visa", "visa_1cls", "mpdd", "btad", "manifest"] = "auto"
    k: int = Field(default=1, ge=1)
    seed: int = 0
    with_replacement: bool = False
    missing: Literal["error", "zero_shot"] = "error"
    method: Literal["winclip", "april_gan", "fade"] | None = None
    vision_multiplier: float = Field(default=3.5, ge=0)
    vision_weight: float = Field(default=0.85, ge=0, le=1)
    vision_features: Literal["clip", "gem"] = "clip"
    query_chunk: int = Field(default=4096, ge=1)
    bank_chunk: int = Field(default=16384, ge=1)
    max_cached_banks: int = Field(default=8, ge=1)
    sampler: Literal["numpy", "torch_randint", "torch_shuffle"] = "numpy"

    @model_validator(mode="after")
    def _torch_sampler(self) -> "FewShotSpec":
        if self.sampler == "torch_randint":
            if not self.with_replacement:
                raise ValueError("few_shot.sampler torch_randint draws with replacement (as torch.randint): set "
                                 "few_shot.with_replacement: true")
            if not 0 <= self.seed < 2**32:
                raise ValueError(f"few_shot.seed {self.seed}: torch_randint needs a seed in [0, 2^32)")
        if self.sampler == "torch_shuffle":
            if self.with_replacement:
                raise ValueError("few_shot.sampler torch_shuffle draws without replacement (a permutation): set "
                                 "few_shot.with_replacement: false")
            if not 0 <= self.seed < 2**64:
                raise ValueError(f"few_shot.seed {self.seed}: torch_shuffle needs a seed in [0, 2^64)")
        return self
