"""Foreground stage (a model actor pool when SAM runs): image -> foreground mask and its components
(METHODS.md section 5).

``foreground.kind``:

- ``sam_dis``: SAM automatic masks (embedded once per image, a grid of point prompts decoded in
  batches), each kept when at least ``min_inside`` of it lies inside the foreground-probability map;
  the union of kept masks is the foreground and the kept masks are the *parts* counted per
  component. The probability map comes from the ONNX dichotomous model ``dis_model`` when one is
  configured, else from :func:`pipeline.ops.foreground.classical_foreground`.
- ``classical``: the classical map thresholded at ``prob_threshold``; no SAM, no parts.
- ``none``: no foreground (every image is scored whole later).

Columns produced (one row per image):

==================  ==========  ============================================================
``fg_rle``          string      COCO RLE (JSON) of the foreground mask at the original image
                                size; None when none / failed
``fg_components``   COMPONENTS  int64 (C, 7): id, x0, y0, x1, y1 (exclusive), area, n_parts
                                (boxes and areas in the original image's pixels)
                                (in flight: ``list<struct>``, :data:`~pipeline.stages.records.COMPONENTS`)
``fg_sam_masks``    int64       SAM masks proposed (0 without SAM)
``fg_kept_masks``   int64       SAM masks kept by the foreground filter
``foreground_ms``   float64     milliseconds for the row (NaN for rows that failed before)
==================  ==========  ============================================================

With ``decode.resolution: working`` the foreground is found on the working image (SAM, the
classical map and the dichotomous model see those pixels) and stored at the original size: the mask
enlarged by nearest neighbour, the boxes and areas those of the enlarged mask. The SAM embedding
handed to sam_refine is the working image's.

A failure on one row makes it an error row (``error_stage = foreground``); the batch goes on.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa

from pipeline.config import ForegroundSpec, RetrySpec, SamSpec
from pipeline.io.fs import StorageOptions
from pipeline.io.retry import retrying, stderr_log
from pipeline.io.weights import resolve
from pipeline.ops import foreground as fgm
from pipeline.ops import rle
from pipeline.stages.base import check_columns
from pipeline.stages.records import (
    COMPONENT_CODEC,
    COMPONENTS,
    TENSOR,
    RowErrors,
    each_row,
    image_at,
    image_hw,
    object_column,
)

STAGE = "foreground"


def _no_components() -> np.ndarray:
    return COMPONENT_CODEC.table(None)


def sam_engine(spec: SamSpec, device, weights_cache: str | None, storage: StorageOptions | None, retries: RetrySpec):
    """A :class:`pipeline.models.sam.SamEngine` for ``spec`` on ``device``: weights fetched (URIs,
    once per node) and loaded, transient failures retried (``retries.model_load``). The SAM pools
    (foreground, sam_refine) build theirs with it. On the CPU, ``spec.cpu_allocator`` applies to
    this worker process (an actor of its own)."""
    from pipeline.models.sam import SamEngine, build_sam, keep_freed_memory

    if device.type == "cpu" and spec.cpu_allocator == "keep_freed" and not keep_freed_memory():
        stderr_log("SAM: glibc's mallopt is not available here; the allocator keeps its defaults")

    def load_sam():
        path = resolve(spec.weights, weights_cache, storage).path if spec.weights else None
        return build_sam(spec.model, path, device=device)

    sam = retrying(load_sam, retries=retries.model_load, backoff_s=retries.backoff_s,
                   max_backoff_s=retries.max_backoff_s, what=f"load SAM {spec.model}", log=stderr_log)
    return SamEngine(sam, device=device, precision=spec.precision)


class ForegroundStage:
    """Batch callable; see the module docstring. ``use_gpu``: run SAM on this worker's GPU."""

    name = STAGE
    timed = True  # foreground_ms; run.json's foreground_busy
    section = "foreground"
    requires = ("image", "status", "error_stage", "error_type", "error_message")
    drops: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: ForegroundSpec,
        sam: SamSpec | None = None,
        *,
        weights_cache: str | None = None,
        storage: StorageOptions | None = None,
        use_gpu: bool = False,
        retries: RetrySpec | None = None,
        share_embedding: bool = False,
    ) -> None:
        self.cfg = cfg
        # when a later stage uses it (sam_refine, same ``sam`` section; build_plan: offering()), the SAM image embedding
        # travels with the row (``sam_embedding``) so the image is encoded once for both stages
        self.share_embedding = share_embedding and cfg.kind == "sam_dis"
        self.sam_spec = sam
        self.weights_cache = weights_cache
        self.storage = storage
        self.use_gpu = use_gpu
        self.retries = retries or RetrySpec()
        self.engine = None
        self.dis = None
        self._ready = False

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None = None) -> "ForegroundStage | None":
        if spec.foreground is None:
            return None
        return cls(spec.foreground, spec.sam, weights_cache=spec.weights_cache, storage=storage, retries=spec.retries)

    @property
    def offers(self) -> tuple[str, ...]:
        """Columns it adds when a later stage of the plan uses them (:func:`pipeline.stages.plan.build_plan`):
        the image's SAM embedding, when SAM makes the foreground."""
        return ("sam_embedding",) if self.cfg.kind == "sam_dis" else ()

    def offering(self, columns: set[str]) -> "ForegroundStage":
        """This stage adding the offered ``columns`` (a copy)."""
        stage = copy.copy(self)
        stage.share_embedding = "sam_embedding" in columns
        return stage

    @property
    def types(self) -> dict[str, object]:
        out = {"fg_rle": pa.string(), "fg_components": COMPONENTS, "fg_sam_masks": pa.int64(),
               "fg_kept_masks": pa.int64(), "foreground_ms": pa.float64(), "status": pa.string(),
               "error_stage": pa.string(), "error_type": pa.string(), "error_message": pa.string()}
        if self.share_embedding:
            out["sam_embedding"] = TENSOR
        return out

    @property
    def produces(self) -> tuple[str, ...]:
        return tuple(self.types)

    @property
    def kind(self) -> str:
        """An actor pool when SAM runs (a model built once per actor), CPU tasks otherwise."""
        return "actor" if self.cfg.kind == "sam_dis" else "task"

    def setup(self) -> None:
        if self._ready:
            return
        import torch

        device = torch.device("cuda") if self.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        r = self.retries
        if self.cfg.kind == "sam_dis":
            self.engine = sam_engine(self.sam_spec or SamSpec(), device, self.weights_cache, self.storage, r)
        if self.cfg.kind == "sam_dis" and self.cfg.dis_model is not None:
            from pipeline.models.dis import DisModel

            def load_dis():
                path = resolve(self.cfg.dis_model, self.weights_cache, self.storage).path
                return DisModel(path, input_size=self.cfg.dis_input_size, device=device.type)

            self.dis = retrying(load_dis, retries=r.model_load, backoff_s=r.backoff_s, max_backoff_s=r.max_backoff_s,
                                what="load the dichotomous segmentation model", log=stderr_log)
        self._ready = True

    # ---------------------------------------------------------------- one image
    def foreground(self, image: np.ndarray,
                   points_per_batch: int | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(foreground bool HxW, components (C, 7), SAM masks proposed, SAM masks kept). The SAM
        embedding of the image is kept in ``self.last_embedding`` (None without SAM).
        ``points_per_batch``: SAM's point prompts decoded per batch (default ``foreground.points_per_batch``).

        An image decoded at a working size (``decode.resolution: working``, marked with its original
        size: :func:`~pipeline.stages.records.image_at`) is segmented at that size; the mask, boxes
        and areas come out at the original size (:func:`pipeline.ops.foreground.components_at`), as
        a full-size decode gives them. The SAM embedding stays the working image's (sam_refine gets
        the same working image)."""
        self.last_embedding = None
        cfg = self.cfg
        original = image_hw(image)
        image = np.asarray(image)  # the pixels, without the mark
        h, w = image.shape[:2]
        if cfg.kind == "none":
            return np.zeros(original, bool), _no_components(), 0, 0
        prob = self.dis.predict(image) if self.dis is not None else fgm.classical_foreground(image, border=cfg.border)
        parts = None
        proposed = kept_n = 0
        if cfg.kind == "sam_dis":
            emb = self.last_embedding = self.engine.embed(image)
            records = self.engine.automatic_masks(
                emb, points_per_side=cfg.points_per_side, points_per_batch=points_per_batch or cfg.points_per_batch,
                pred_iou_thresh=cfg.pred_iou_thresh, stability_score_thresh=cfg.stability_score_thresh,
                box_nms_thresh=cfg.box_nms_thresh,
            )
            masks = [r["segmentation"] for r in records]
            keep = fgm.filter_masks(masks, prob, min_inside=cfg.min_inside, prob_threshold=cfg.prob_threshold)
            parts = [masks[i] for i in keep]
            proposed, kept_n = len(masks), len(keep)
            fg = fgm.union(parts, (h, w))
        else:
            fg = prob >= cfg.prob_threshold
        min_area = int(np.ceil(cfg.min_component_fraction * h * w))
        labels, comps = fgm.components(fg, parts, min_area=min_area)
        mask = labels >= 0
        if original != (h, w):  # decoded at a working size: the mask and the components in the original's pixels
            mask, comps = fgm.components_at(labels, comps, original)
        table = COMPONENT_CODEC.table([[c.id, *c.box, c.area, c.n_parts] for c in comps])
        return mask, table, proposed, kept_n

    def _foreground_fitting(self, image: np.ndarray):
        """:meth:`foreground`, and when SAM runs out of accelerator memory on the image: the cache
        freed and the point prompts decoded in halved batches, down to one point at a time; an
        image that does not fit even so fails alone with ``OutOfMemory``."""
        from pipeline.models.precision import alone, check_injected, free_cache, is_out_of_memory

        per_batch = self.cfg.points_per_batch
        while True:
            try:
                check_injected(STAGE, [image.shape])
                return self.foreground(image, points_per_batch=per_batch)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(exc) or self.cfg.kind != "sam_dis":
                    raise
                error = exc
            free_cache()
            if per_batch == 1:
                raise alone(STAGE, error)
            per_batch = max(1, per_batch // 2)
            stderr_log(f"{STAGE}: out of accelerator memory on a {image.shape[1]} x {image.shape[0]} image; "
                       f"freed the cache, retrying with points_per_batch={per_batch}")

    # ---------------------------------------------------------------- call
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        self.setup()
        errors = RowErrors(batch, n)
        fg_rle = object_column([None] * n)
        comps = object_column([_no_components() for _ in range(n)])
        proposed = np.zeros(n, dtype=np.int64)
        kept = np.zeros(n, dtype=np.int64)
        ms = np.full(n, np.nan)
        embeddings = object_column([np.zeros((0, 0, 0), np.float32) for _ in range(n)])

        def row(i: int) -> None:
            mask, table, proposed[i], kept[i] = self._foreground_fitting(image_at(batch, i))
            if self.share_embedding and self.last_embedding is not None:
                embeddings[i] = self.last_embedding.features[0].detach().float().cpu().numpy()
            comps[i] = table
            if self.cfg.kind != "none":
                fg_rle[i] = json.dumps(rle.encode(mask))

        each_row(errors.status, row, ms=ms, errors=errors, stage=STAGE, what="foreground extraction failed")
        out = {**batch, "fg_rle": fg_rle, "fg_components": comps, "fg_sam_masks": proposed, "fg_kept_masks": kept,
               "foreground_ms": ms, **errors.columns()}
        if self.share_embedding:
            out["sam_embedding"] = embeddings
        return out
