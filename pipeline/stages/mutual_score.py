"""Mutual scorer (MuSc; MUSC.md): every image's patches against its category's pool.

The scorer of the ``clip_score`` stage (:class:`pipeline.stages.clip_score.ClipScoreStage`) in a job
with ``score.kind: mutual`` (same stage, resources ``resources.clip_score``, same columns, plus
``score_mutual`` and ``image_embedding``). It composes a :class:`pipeline.stages.clip_model.ClipScorer`
for the CLIP model (set-up, preprocessing, stored banks); per batch it runs one forward
pass at ``pixel.image_size`` (squashed), keeps the raw outputs of ``pixel.layers`` and the unit image
embedding, and scores each image against its category's pool
(:mod:`pipeline.models.mutual`): the pool's standardised block tokens are read once per category
from the run folder (``RUN/pools/<category>/``: its manifest, digest and precision checked, and
its memory-mapped part files) and kept for the ``mutual.max_cached_pools`` most recent
categories; a pool larger than ``mutual.max_pool_bytes`` is not held but read in chunks of images
through the same running top-K. Each row says which actor scored it (``scorer``) and how many
pools that actor had loaded (``pool_loads``).

Each image is compared with P - 1 pool images: itself is left out when it is in the pool, else the
pool's last image, so every image of a category has the same K. The map is upsampled (bilinear,
align_corners=True) to the stored map size and clipped to [0, 2]; ``score`` (= ``score_mutual``) is
the maximum of the map upsampled to the model's input size, as MuSc takes it. A category whose pool
is too small for the interval (fewer than 5 usable images) fails its rows with ``PoolTooSmall``.
The same scorer computes the pool's features (:meth:`bank_features`, used by the pool pass), so the
pool and the queries come from one piece of code.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from pipeline.config import MutualSpec, SpecError
from pipeline.io.fs import StorageOptions
from pipeline.ops.heatmap import map_shape
from pipeline.stages.base import LazyModule, model_work
from pipeline.stages.clip_model import ClipScorer, clip_models, precision
from pipeline.stages.pixel_methods import PixelMethod, register
from pipeline.stages.records import image_hw

torch = LazyModule("torch")
mutual = LazyModule("pipeline.models.mutual")

MIN_POOL = 5  # images; K = int(0.3 * (P - 1)) is 0 below


@register("mutual")
class MutualMaps(PixelMethod):
    """``pixel.kind: mutual``: its settings checked against the model; the maps are the
    :class:`MutualScorer`'s own."""

    def check(self, scorer: Any) -> None:
        visual = scorer.model.visual
        blocks = len(visual.transformer.resblocks)
        if scorer.pixel.layers[-1] > blocks:
            raise SpecError(f"pixel.layers {list(scorer.pixel.layers)} exceed the {blocks} blocks of "
                            f"{scorer.clip.model}")
        from pipeline.models import vit

        patch = vit.patch_size(visual)
        if scorer.pixel.image_size % patch:
            raise SpecError(f"pixel.image_size {scorer.pixel.image_size} is not a multiple of {scorer.clip.model}'s "
                            f"patch size {patch} (MuSc: 518 for ViT-L-14-336, 240 for ViT-B-16-plus-240)")


def _shared(name: str) -> property:
    """An attribute of the composed CLIP scorer, read (and set) through the mutual scorer."""
    return property(lambda self: getattr(self.base, name), lambda self, value: setattr(self.base, name, value))


class MutualScorer:
    """Mutual scores and maps of a batch of images against their categories' pools; its input is
    the pools (``pools``: category -> {"uri", "digest", "images", "image_ids"}; a category without an
    entry has no usable pool), given by the driver once they are built (:meth:`use_inputs`)."""

    inputs: tuple[str, ...] = ("pools",)
    extra_outputs: tuple[str, ...] = ("score_mutual", "image_embedding")
    extra_types: Mapping[str, Any] = {"score_mutual": pa.float64(), "image_embedding": pa.list_(pa.float32())}
    loads_column = "pool_loads"

    model = _shared("model")
    preprocess = _shared("preprocess")
    device = _shared("device")
    precision = _shared("precision")
    use_gpu = _shared("use_gpu")
    storage = _shared("storage")
    clip = _shared("clip")
    pixel = _shared("pixel")
    maps = _shared("maps")
    map_range = _shared("map_range")

    def __init__(self, base: ClipScorer, mutual_spec: MutualSpec) -> None:
        self.base = base
        self.mutual = mutual_spec
        self.pools: dict[str, dict] = {}
        self._pool_cache: collections.OrderedDict = collections.OrderedDict()
        self.pool_loads = 0

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None = None) -> "MutualScorer":
        base = ClipScorer(spec.clip, spec.score, weights_cache=spec.weights_cache, storage=storage, pixel=spec.pixel,
                          maps=spec.maps, retries=spec.retries, map_range=spec.map_range())
        return cls(base, spec.mutual)

    def setup(self) -> None:
        self.base.setup()

    def use_inputs(self, inputs: Mapping[str, Any] | None) -> None:
        """Take the driver's inputs (the pools)."""
        for name, value in (inputs or {}).items():
            if name in self.inputs:
                setattr(self, name, dict(value))

    def loads(self) -> int:
        return self.pool_loads

    # ---------------------------------------------------------------- features
    def _forward(self, images: list[np.ndarray]):
        """(unit embeddings (B, E), raw block tokens [(B, M, C)], grid) of one pass."""
        pre = dataclasses.replace(self.preprocess, size=self.pixel.image_size)
        batch = clip_models.preprocess_images(self.base._tensors(images), pre, device=self.device)
        dtype = next(self.model.parameters()).dtype
        return mutual.image_features(self.model.visual, batch.to(dtype), self.pixel.layers)

    @model_work
    def bank_features(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Per pool image: its standardised block tokens {``layer<l>``: (1, M, C)} and its unit
        embedding {``embedding``: (1, E)}, float32."""
        emb, tokens, _ = self._forward(images)
        normed = [mutual.layer_norm_map(t) for t in tokens]
        out = []
        for i in range(len(images)):
            feats = {f"layer{l}": n[i : i + 1].cpu().numpy().astype(np.float32)
                     for l, n in zip(self.pixel.layers, normed)}
            feats["embedding"] = emb[i : i + 1].cpu().numpy().astype(np.float32)
            out.append(feats)
        return out

    def pool(self, category: str) -> dict:
        """The pool of ``category``: {"ids": [...], "layers": {l: (P, M, C)} on this actor's device}
        when it fits in ``mutual.max_pool_bytes``, else {"ids", "stored", "chunk"}: the mapped parts,
        read ``chunk`` images at a time while scoring. Opened once while cached."""
        cached = self._pool_cache.get(category)
        if cached is not None:
            self._pool_cache.move_to_end(category)
            return cached
        stored = self.base.open_stored(self.pools[category])
        keys = [f"layer{l}" for l in self.pixel.layers]
        per_image = max(stored.image_bytes(keys), 1)
        n = len(stored.image_ids)
        if per_image * n <= self.mutual.max_pool_bytes:
            pool = {"ids": list(stored.image_ids),
                    "layers": {l: precision.to_device(torch.from_numpy(stored.rows(f"layer{l}")), self.device)
                               for l in self.pixel.layers}}
        else:
            pool = {"ids": list(stored.image_ids), "stored": stored, "chunk": self._stream_chunk(per_image, stored)}
        self.pool_loads += 1
        self._pool_cache[category] = pool
        while len(self._pool_cache) > self.mutual.max_cached_pools:
            self._pool_cache.popitem(last=False)
        return pool

    def _stream_chunk(self, per_image: int, stored) -> int:
        """Pool images per read when streaming: as many as ``max_pool_bytes`` holds, rounded down to
        a multiple of the images one nearest-patch block compares (``pool_chunk`` // patches), so
        the running top-K sees the same blocks as the in-memory computation (equal results)."""
        fit = max(1, self.mutual.max_pool_bytes // per_image)
        patches = (stored.row_shape(f"layer{self.pixel.layers[0]}") or (1,))[0]
        block = max(1, self.mutual.pool_chunk // patches)
        return fit - fit % block if fit >= block else fit

    def _mutual_grids(self, queries, pool: dict, grid: int, k: int, exclude) -> "torch.Tensor":
        """The mutual maps of queries against a pool held in memory, or streamed in chunks through
        the same running top-K (:func:`pipeline.models.mutual.update`)."""
        if "layers" in pool:
            return mutual.mutual_map(queries, pool["layers"], grid, k, exclude, self.mutual.query_chunk,
                                     self.mutual.pool_chunk)
        if k < 1:
            raise mutual.PoolTooSmall(f"K = {k}: the pool is too small for the interval")
        state = mutual.MutualState(k)
        stored, step, p = pool["stored"], pool["chunk"], len(pool["ids"])
        for j0 in range(0, p, step):
            j1 = min(p, j0 + step)
            part = {l: precision.to_device(torch.from_numpy(stored.rows(f"layer{l}", j0, j1)), self.device)
                    for l in self.pixel.layers}
            mutual.update(state, queries, part, grid, exclude[:, j0:j1], self.mutual.query_chunk,
                          self.mutual.pool_chunk)
        return mutual.finish(state, grid)

    # ---------------------------------------------------------------- scoring
    def score_rows(self, images, categories, image_ids) -> dict[str, object]:
        return self.score_images(images, categories, image_ids=image_ids)

    @model_work
    def score_images(self, images: list[np.ndarray], categories: list[str], map_side: int | None = None,
                     image_ids: list[str | None] | None = None) -> dict[str, object]:
        b = len(images)
        if image_ids is None:
            image_ids = [None] * b
        short = sorted({c for c in categories if int(self.pools.get(c, {}).get("images", 0)) < MIN_POOL})
        if short:
            sizes = ", ".join(f"{c!r} {int(self.pools.get(c, {}).get('images', 0))}" for c in short)
            raise mutual.PoolTooSmall(f"mutual scoring needs at least {MIN_POOL} usable images per category; "
                               f"usable images: {sizes}")
        emb, tokens, grid = self._forward(images)
        layers, degrees = self.pixel.layers, self.pixel.degrees
        queries = mutual.query_features(tokens, layers, degrees, grid)
        grids = torch.empty((b, grid, grid), device=emb.device)
        cats = np.asarray(categories, dtype=object)
        for cat in dict.fromkeys(categories):
            idx = np.flatnonzero(cats == cat)
            pool = self.pool(cat)
            p = len(pool["ids"])
            position = {iid: j for j, iid in enumerate(pool["ids"])}
            exclude = torch.zeros((len(idx), p), dtype=torch.bool)
            for row, i in enumerate(idx.tolist()):
                exclude[row, position.get(image_ids[i], p - 1)] = True  # itself, else the pool's last image
            k = mutual.interval_k(p - 1, self.mutual.interval)
            t = torch.from_numpy(idx).to(emb.device)
            grids[t] = self._mutual_grids({key: v[t] for key, v in queries.items()}, pool, grid, k, exclude)
        side = self.pixel.image_size
        score = mutual.upsample(grids, (side, side)).amax(dim=(1, 2)).double().cpu().numpy()
        maps, max_pixel = [], np.full(b, np.nan)
        for i, img in enumerate(images):
            shape = map_shape(*image_hw(img), self.maps.map_size)
            m = mutual.upsample(grids[i : i + 1], shape)[0].clamp(*self.map_range)
            maps.append(m.cpu().numpy().astype(np.float32))
            max_pixel[i] = float(maps[-1].max())
        nan = np.full(b, np.nan)
        return {"score": score, "score_language": nan, "score_vision": nan.copy(), "score_fewshot": nan.copy(),
                "max_pixel_score": max_pixel, "maps": maps, "few_shot_k": [None] * b, "reference_digest": [None] * b,
                "score_mutual": [float(v) for v in score],
                "image_embedding": [e for e in emb.cpu().numpy().astype(np.float32)]}
