"""Mutual scoring (MuSc): the ``mutual`` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import SpecModel


class MutualSpec(SpecModel):
    """Mutual scoring of the input's own images (MuSc; MUSC.md; needs ``pixel.kind: mutual``).

    Per category a *pool* of images of the input is chosen deterministically (the
    ``pool_size + 1`` images with the smallest sha256 of ``seed`` and their URI; the whole category
    when it has at most ``pool_size + 1`` images), written to ``RUN/pools.parquet``; the pool's
    features are computed once per category (``RUN/pools/<category>/``: part files written by the
    actors and a manifest, reused on resume) and read by the scoring actors. Every image of the
    category is compared with ``P - 1`` pool images, P the pool's size (itself left out when it is
    in the pool, else the pool's last image), so with a whole-category pool the result is MuSc
    exactly. Per patch the mean of the ``int(interval * (P - 1))`` smallest nearest-patch distances
    is kept (MuSc: 0.3). A category with fewer than 5 usable images cannot be scored (its rows fail
    with ``PoolTooSmall``).

    ``rscin``: after every image is scored, MuSc's RsCIN re-scores each image with its ``k_list``
    nearest images of the category by CLIP image embedding (``score_rscin``; a k above the
    category's size counts all its images). ``k_list`` unset follows the input's layout as MuSc's
    code does: [1, 8, 9] for visa and visa_1cls, [1, 2, 3] for every other layout (MVTec AD, BTAD,
    ...); run.json records what was used. RsCIN runs as Ray tasks, one per category, a category of
    more than ``rscin_chunk`` images split into query chunks of that many rows. ``score``:
    which image score the ``score`` column holds, ``rscin`` or ``raw`` (the map's maximum). Both
    are transductive: an image's score depends on the other images of its category.
    ``query_chunk``/``pool_chunk``: patches per block of the nearest-patch search (memory per block
    = their product x 4 bytes). ``max_cached_pools``: pools a scoring actor keeps in memory.
    ``max_pool_bytes``: the most of one pool a scoring actor holds; a larger pool is read from its
    memory-mapped part files in chunks of images through the same running top-K (same results).
    ``pool_dtype``: how pools are stored, ``float32`` (exact) or ``float16`` (half the bytes on
    storage, in the node cache and in the actor; computed in float32 after reading)."""

    pool_size: int = Field(default=200, ge=4)
    seed: int = 0
    interval: float = Field(default=0.3, gt=0, le=1)
    rscin: bool = True
    k_list: tuple[int, ...] | None = None
    score: Literal["rscin", "raw"] = "rscin"
    query_chunk: int = Field(default=4096, ge=1)
    pool_chunk: int = Field(default=16384, ge=1)
    max_cached_pools: int = Field(default=2, ge=1)
    max_pool_bytes: int = Field(default=2 << 30, ge=1)
    pool_dtype: Literal["float32", "float16"] = "float32"
    rscin_chunk: int = Field(default=20000, ge=1)

    @field_validator("k_list")
    @classmethod
    def _k_list(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not value or any(k < 1 for k in value):
            raise ValueError("k_list needs window sizes >= 1 (MuSc: [1, 2, 3], VisA [1, 8, 9])")
        return value

    @model_validator(mode="after")
    def _score_needs_rscin(self) -> "MutualSpec":
        if self.score == "rscin" and not self.rscin:
            raise ValueError("mutual.score rscin needs mutual.rscin: true (or set mutual.score: raw)")
        return self

    def windows(self, layout: str | None) -> tuple[int, ...]:
        """RsCIN's window sizes: ``k_list`` when set, else by the input's layout as MuSc's code
        chooses them ([1, 8, 9] for VisA, [1, 2, 3] otherwise)."""
        if self.k_list is not None:
            return tuple(self.k_list)
        return (1, 8, 9) if layout in ("visa", "visa_1cls") else (1, 2, 3)
