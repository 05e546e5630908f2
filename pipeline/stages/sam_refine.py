"""SAM refinement stage: the CLIP-SAM prompt cascade (METHODS.md section 6) on each image's CLIP map.

An actor pool (``resources.sam_refine``) after CLIP scoring (and the tile aggregation), before
encoding. Per image: the stored CLIP map is brought to the image's resolution (bilinear); the
extreme region R, the positive points in it and the negative points in the ring around it are chosen
(:mod:`pipeline.ops.points`); SAM embeds the image ONCE and its decoder runs the cascade
(:meth:`pipeline.models.sam.SamEngine.cascade`: points; + the logits; + the box); the refined mask
and the CLIP map make the final map (``sam_refine.combine``), stored at the map size again.

Columns: ``anomaly_map`` and ``max_pixel_score`` replaced for refined rows; ``refined`` (bool);
``refine_rle`` (the refined mask at the image's resolution, COCO RLE JSON; null when not refined);
``refine_info`` (JSON: positive and negative points (x, y), the step-3 box, SAM's predicted IoU per
step, whether steps 2-3 chose among SAM's three masks, the ring kernel and point spacing in the
image's pixels; for a row not refined: ``refined`` false and the reason); ``sam_refine_ms``. Rows
below ``score_gate`` or without a region keep the CLIP map (``refined`` false). A map with NaN or
infinite values, a constant map, an empty image or a decoder failure is a per-row error (stage
``sam_refine``), never a crash.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa

from pipeline.config import RetrySpec, SamRefineSpec, SamSpec
from pipeline.io.fs import StorageOptions
from pipeline.ops import points as pts
from pipeline.ops import rle
from pipeline.ops.heatmap import resize_map, resize_nearest
from pipeline.stages.base import check_columns
from pipeline.stages.records import TENSOR, RowErrors, each_row, image_at, image_hw, object_column

STAGE = "sam_refine"
SAM_INPUT = 1024  # the long side of SAM's input: where sam_refine's geometry is measured by default


def combine(clip_map: np.ndarray, mask: np.ndarray, how: str, weight: float, lo: float, hi: float) -> np.ndarray:
    """The final map from the CLIP map C and the refined mask M (both at one size), on [lo, hi]."""
    m = mask.astype(bool)
    if how == "max":
        return np.maximum(clip_map, np.where(m, hi, lo))
    if how == "replace":
        return np.where(m, hi, lo).astype(np.float64)
    if how == "blend":
        return (1.0 - weight) * clip_map + weight * np.where(m, hi, lo)
    if how == "gate":
        return np.where(m, clip_map, lo).astype(np.float64)
    raise ValueError(f"unknown combine {how!r} (max, replace, blend, gate)")


class SamRefineStage:
    """Batch callable; see the module docstring. ``use_gpu``: run SAM on this worker's GPU."""

    name = STAGE
    timed = True  # sam_refine_ms; run.json's sam_refine_busy
    section = "sam_refine"
    kind = "actor"
    requires = ("image", "anomaly_map", "score", "status", "error_stage", "error_type", "error_message")
    types = {"anomaly_map": TENSOR, "max_pixel_score": pa.float64(), "refined": pa.bool_(),
             "refine_rle": pa.string(), "refine_info": pa.string(), "sam_refine_ms": pa.float64(),
             "status": pa.string(), "error_stage": pa.string(), "error_type": pa.string(),
             "error_message": pa.string()}
    produces = tuple(types)
    #: its columns' values in a plan without it (the driver adds them to the result rows)
    defaults = {"refined": False}

    def __init__(self, cfg: SamRefineSpec, sam: SamSpec, *, map_range: tuple[float, float] = (0.0, 1.0),
                 weights_cache: str | None = None, storage: StorageOptions | None = None, use_gpu: bool = False,
                 retries: RetrySpec | None = None, engine=None, shared_embedding: bool = False) -> None:
        self.cfg = cfg
        # a SAM foreground stage earlier in the plan hands over the image's embedding (sam_embedding;
        # build_plan sets it up with using())
        self.shared_embedding = shared_embedding
        self.sam_spec = sam
        self.lo, self.hi = map_range
        self.weights_cache = weights_cache
        self.storage = storage
        self.use_gpu = use_gpu
        self.retries = retries or RetrySpec()
        self.engine = engine  # tests may hand in a built SamEngine

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None = None) -> "SamRefineStage | None":
        if spec.sam_refine is None:
            return None
        return cls(spec.sam_refine, spec.sam, map_range=spec.map_range(), weights_cache=spec.weights_cache,
                   storage=storage, retries=spec.retries)

    #: columns it reads when an earlier stage offers them (:func:`pipeline.stages.plan.build_plan`)
    uses: tuple[str, ...] = ("sam_embedding",)

    def using(self, columns: set[str]) -> "SamRefineStage":
        """This stage reading the offered ``columns`` (a copy; it drops the embedding after use)."""
        stage = copy.copy(self)
        stage.shared_embedding = "sam_embedding" in columns
        return stage

    @property
    def drops(self) -> tuple[str, ...]:
        return ("sam_embedding",) if self.shared_embedding else ()

    def setup(self) -> None:
        if self.engine is not None:
            return
        import torch

        from pipeline.stages.foreground import sam_engine

        device = torch.device("cuda") if self.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.engine = sam_engine(self.sam_spec, device, self.weights_cache, self.storage, self.retries)

    # ---------------------------------------------------------------- one image
    def refine(self, image: np.ndarray, stored_map: np.ndarray, score: float,
               features: np.ndarray | None = None) -> tuple[np.ndarray, bool, str | None, str | None]:
        """(final map at the stored size, refined?, refined mask RLE JSON, info JSON) for one image.
        ``features``: the image's SAM embedding (C, g, g) when an earlier stage made it."""
        cfg = self.cfg
        stored = np.asarray(stored_map, dtype=np.float64)
        if image.ndim != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"empty image {image.shape}")
        if stored.ndim != 2 or min(stored.shape) < 1:
            raise ValueError(f"no pixel map to refine (shape {stored.shape})")
        if not np.isfinite(stored).all():
            raise ValueError("the CLIP map holds NaN or infinite values")
        if cfg.score_gate is not None and not score >= cfg.score_gate:
            why = f"image score {score:.4g} below sam_refine.score_gate {cfg.score_gate:g}"
            return stored, False, None, json.dumps({"refined": False, "reason": why})
        h, w = image.shape[:2]
        full = resize_map(stored, (h, w))
        region = pts.extreme_region(full, cfg.threshold_mode, cfg.threshold)  # constant map: ValueError
        if not region.any():
            why = (f"no pixel of the map reaches the region threshold ({cfg.threshold_mode} {cfg.threshold:g}; "
                   f"the map's maximum is {float(full.max()):.4g})")
            return stored, False, None, json.dumps({"refined": False, "reason": why})
        ring_kernel, min_distance = self.geometry(h, w)
        if features is not None and features.size:  # made by the foreground stage: not encoded again
            import torch

            from pipeline.models.sam import SamEmbedding

            given = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None].to(self.engine.device)
            shape = self.engine.transform.get_preprocess_shape(h, w, self.engine.img_size)
            emb = SamEmbedding(features=given, original_size=(h, w), input_size=shape)
        else:
            emb = self.engine.embed(np.ascontiguousarray(image))  # the image encoder runs once
        positive = pts.positive_points(full, region, k=cfg.positive_points, min_distance=min_distance,
                                       squared=cfg.squared_distance)
        negative = np.zeros((0, 2), np.int64)
        if cfg.negative_points:
            features = emb.features[0].detach().float().cpu().numpy()
            negative = pts.negative_points(features, region, pts.ring(region, ring_kernel), emb.input_size,
                                           emb.original_size, k=cfg.negative_points, min_distance=min_distance,
                                           squared=cfg.squared_distance)
        points = np.concatenate([positive, negative]).astype(np.float32)
        labels = np.concatenate([np.ones(len(positive), np.int64), np.zeros(len(negative), np.int64)])
        steps = self.engine.cascade(emb, points, labels, steps=cfg.steps, multimask=cfg.multimask)
        mask = steps[-1].mask.detach().cpu().numpy().astype(bool)
        final_full = combine(full, mask, cfg.combine, cfg.blend_weight, self.lo, self.hi)
        final = np.clip(resize_map(final_full, stored.shape), self.lo, self.hi)
        # decoded at a working size (decode.resolution: working): the mask and the prompts in the
        # original image's pixels, as a full-size decode gives them
        (oh, ow), box = image_hw(image), steps[-1].box
        if (oh, ow) != (h, w):
            mask = resize_nearest(mask, (oh, ow))
            to_original = np.array([ow / w, oh / h])  # points are (x, y)
            positive, negative = ((p + 0.5) * to_original - 0.5 for p in (positive, negative))  # pixel centres
            box = None if box is None else [float(v) * f for v, f in zip(box, [ow / w, oh / h] * 2)]
        info = {"refined": True, "positive": positive.tolist(), "negative": negative.tolist(),
                "box": None if box is None else [float(v) for v in box],
                "iou": [s.iou for s in steps], "steps": len(steps), "multimask": cfg.multimask,
                "geometry": cfg.geometry, "ring_kernel_px": ring_kernel, "min_distance_px": min_distance}
        return final, True, json.dumps(rle.encode(mask)), json.dumps(info)

    def geometry(self, h: int, w: int) -> tuple[int, float]:
        """(ring kernel, minimum point distance) in the image's pixels: ``sam_refine.ring_kernel`` and
        ``min_distance`` as given (``geometry: image``), or given in pixels of SAM's input, whose long
        side is 1024, and scaled to this image (``sam_input``; the kernel stays odd and >= 3)."""
        cfg = self.cfg
        if cfg.geometry == "image":
            return cfg.ring_kernel, cfg.min_distance
        scale = max(h, w) / float(SAM_INPUT)
        kernel = max(3, int(round(cfg.ring_kernel * scale)))
        kernel += 1 - kernel % 2  # odd: an elliptical kernel has a centre pixel
        return kernel, cfg.min_distance * scale

    def _refine_fitting(self, image: np.ndarray, stored_map: np.ndarray, score: float, features: np.ndarray | None):
        """:meth:`refine`; when SAM runs out of accelerator memory: the cache freed and the image tried
        once more (alone on the device), then ``OutOfMemory`` for this row."""
        from pipeline.io.retry import stderr_log
        from pipeline.models.precision import alone, check_injected, free_cache, is_out_of_memory

        error = None
        for attempt in range(2):
            try:
                check_injected(STAGE, [image.shape])
                return self.refine(image, stored_map, score, features)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(exc):
                    raise
                error = exc
                free_cache()
                if attempt == 0:
                    stderr_log(f"{STAGE}: out of accelerator memory on a {image.shape[1]} x {image.shape[0]} image; "
                               "freed the cache, trying it once more")
        raise alone(STAGE, error)

    # ---------------------------------------------------------------- call
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        self.setup()
        errors = RowErrors(batch, n)
        maps = object_column(list(batch["anomaly_map"]))
        max_pixel = np.asarray(batch.get("max_pixel_score", np.full(n, np.nan)), dtype=np.float64).copy()
        refined = np.zeros(n, dtype=bool)
        rles = object_column([None] * n)
        infos = object_column([None] * n)
        ms = np.full(n, np.nan)

        def row(i: int) -> None:
            shared = np.asarray(batch["sam_embedding"][i]) if "sam_embedding" in batch else None
            final, done, mask_rle, info = self._refine_fitting(image_at(batch, i),
                                                               np.asarray(batch["anomaly_map"][i]),
                                                               float(batch["score"][i]), shared)
            infos[i] = info  # refined: the prompts and results; kept: why
            if done:
                maps[i] = final.astype(np.float32)
                max_pixel[i] = float(final.max())
                refined[i], rles[i] = True, mask_rle

        def failed(i: int) -> None:
            maps[i], max_pixel[i] = np.zeros((0, 0), np.float32), np.nan

        each_row(errors.status, row, ms=ms, errors=errors, stage=STAGE, what="SAM refinement failed", on_error=failed)
        kept = {k: v for k, v in batch.items() if k not in self.drops}
        return {**kept, "anomaly_map": maps, "max_pixel_score": max_pixel, "refined": refined, "refine_rle": rles,
                "refine_info": infos, "sam_refine_ms": ms, **errors.columns()}
