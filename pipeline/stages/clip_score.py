"""The CLIP scoring stage (``clip_score``): rows in, scored rows out.

Runs as a model actor pool. The stage owns the rows: which rows it scores (failed rows pass through
untouched), batches split when the accelerator runs out of memory, tiles in tiling mode, the
columns it adds and the per-row errors (``status = error`` with ``error_stage = clip_score``). What
a batch's images score comes from its *scorer*, chosen by ``score.kind`` (:data:`SCORERS`): the CLIP
scorer (:class:`pipeline.stages.clip_model.ClipScorer`: zero-shot score, the pixel method of
``pixel.kind``, the few-shot strategies) or the mutual scorer
(:class:`pipeline.stages.mutual_score.MutualScorer`, MuSc), which composes a CLIP scorer. The scorer's
inputs (few-shot banks, mutual pools) reach it through :meth:`ClipScoreStage.setup`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa

from pipeline.config import (
    ClipSpec,
    MutualSpec,
    TilingSpec,
    ZeroShotImageScore,
)
from pipeline.io.fs import StorageOptions
from pipeline.io.retry import stderr_log
from pipeline.stages.base import check_columns
from pipeline.stages.clip_model import (  # noqa: F401 - pick_device, prompt_file_problem: by their old names
    SCORE_KEYS,
    ClipScorer,
    ModelFactory,
    pick_device,
    precision,
    prompt_file_problem,
)
from pipeline.stages.mutual_score import MutualScorer
from pipeline.stages.records import TENSOR, RowErrors, image_at, object_column, working_box

STAGE = "clip_score"
Scorer = Any  # ClipScorer | MutualScorer

#: score.kind -> the scorer of a job spec
SCORERS: dict[str, Callable[..., Scorer]] = {
    "winclip_zero_shot": ClipScorer.from_spec,
    "mutual": MutualScorer.from_spec,
}


class ClipScoreStage:
    """Batch callable: adds ``score`` (float64, NaN when not scored), ``score_vision`` (NaN when the
    method has none), ``max_pixel_score``, ``anomaly_map`` (float32 (H, W) maps in [0, 1] at the
    configured map size; empty (0, 0) when there is no map), ``scoring_mode`` (``whole_image``, or
    ``tiles`` in tiling mode until the aggregation decides; None for failed rows) and
    ``clip_score_ms``; in tiling mode also ``tile_scores`` and ``tile_maps``; the scorer's own
    columns (mutual: ``score_mutual``, ``image_embedding``).

    Built from a job spec (:meth:`from_spec`) or from its sections: ``mutual_spec`` makes it the
    mutual scorer's stage; ``model_factory`` (optional) returns (model, preprocess) and replaces
    weight resolution, for tests that build their own model. The scorer's attributes (``model``,
    ``score_images``, ``text_classifier``...) are readable on the stage.
    """

    name = STAGE
    section = "clip"
    kind = "actor"
    timed = True  # clip_score_ms; run.json's clip_score_busy
    requires = ("image", "category", "status", "error_stage", "error_type", "error_message")
    drops: tuple[str, ...] = ()

    def __init__(
        self,
        clip: ClipSpec | None,
        score: ZeroShotImageScore,
        *,
        tiling: TilingSpec | None = None,
        mutual_spec: MutualSpec | None = None,
        scorer: Scorer | None = None,
        **scorer_options: Any,
    ) -> None:
        """``scorer_options``: the keyword arguments of :class:`ClipScorer` (``pixel``, ``maps``,
        ``few_shot``, ``model_factory``...), for a scorer built here (``scorer`` None)."""
        if scorer is None:
            scorer = ClipScorer(clip, score, **scorer_options)
            if mutual_spec is not None:
                scorer = MutualScorer(scorer, mutual_spec)
        self.scorer = scorer
        self.tiling = tiling
        self.tile_batch_size = 16
        self.oom_splits = 0  # batches this actor split after running out of accelerator memory

    @classmethod
    def from_spec(cls, spec, storage: StorageOptions | None = None) -> "ClipScoreStage":
        return cls(None, spec.score, scorer=scorer_from_spec(spec, storage), tiling=spec.tiling)

    def __getattr__(self, name: str) -> Any:
        """The scorer's attributes, read through the stage (``stage.model``, ``stage.score_images``)."""
        scorer = self.__dict__.get("scorer")
        if scorer is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(scorer, name)

    @property
    def use_gpu(self) -> bool:
        return self.scorer.use_gpu

    @use_gpu.setter
    def use_gpu(self, value: bool) -> None:
        self.scorer.use_gpu = value

    @property
    def banks(self) -> dict:
        return self.scorer.banks

    @banks.setter
    def banks(self, value: dict) -> None:
        self.scorer.use_inputs({"banks": value})

    @property
    def pools(self) -> dict:
        return self.scorer.pools

    @pools.setter
    def pools(self, value: dict) -> None:
        self.scorer.use_inputs({"pools": value})

    @property
    def inputs(self) -> tuple[str, ...]:
        """What the driver hands the stage at set-up (:meth:`setup`): its scorer's banks or pools."""
        return self.scorer.inputs

    @property
    def types(self) -> dict[str, object]:
        out = {"score": pa.float64(), "score_language": pa.float64(), "score_vision": pa.float64(),
               "score_fewshot": pa.float64(), "few_shot_k": pa.int64(), "reference_digest": pa.string(),
               "max_pixel_score": pa.float64(), "anomaly_map": TENSOR,
               "scoring_mode": pa.string(), "clip_score_ms": pa.float64(), "status": pa.string(),
               "error_stage": pa.string(), "error_type": pa.string(), "error_message": pa.string()}
        if self.tiling is not None:
            out.update(tile_scores=pa.list_(pa.float64()), tile_maps=TENSOR)
        loads = self.scorer.loads_column
        if loads:
            out.update({"scorer": pa.string(), loads: pa.int64()})
        out.update(self.scorer.extra_types)
        return out

    @property
    def produces(self) -> tuple[str, ...]:
        return tuple(self.types)

    def setup(self, inputs: Mapping[str, Any] | None = None) -> None:
        """Build the scorer's model (once), and take the driver's ``inputs`` (banks or pools)."""
        if inputs:
            self.scorer.use_inputs(inputs)
        self.scorer.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        self.setup()
        out = dict(batch)
        errors = RowErrors(batch, n)
        cols = {k: np.full(n, np.nan) for k in (*SCORE_KEYS, "clip_score_ms")}
        few_k, ref_digest = object_column([None] * n), object_column([None] * n)
        extras = {k: object_column([None] * n) for k in self.scorer.extra_outputs}
        maps = object_column([_NO_MAP] * n)
        todo = [i for i in range(n) if errors.ok(i)]
        images = [image_at(batch, i) for i in range(n)]  # decoded at a working size: maps at the original's
        cats = [str(c) for c in batch["category"]]
        ids = [str(v) for v in batch["image_id"]] if "image_id" in batch else [None] * n

        def fail(i: int, exc: BaseException) -> None:
            errors.fail_with(i, STAGE, exc, "scoring failed")

        def store(rows: list[int], result: dict[str, object], ms: float) -> None:
            for key in SCORE_KEYS:
                cols[key][rows] = result[key]
            cols["clip_score_ms"][rows] = ms
            for j, i in enumerate(rows):
                if result["maps"]:
                    maps[i] = result["maps"][j]
                few_k[i] = result["few_shot_k"][j]
                ref_digest[i] = result["reference_digest"][j]
                for key, col in extras.items():
                    col[i] = result[key][j]

        if todo and self.tiling is not None:
            tile_scores, tile_maps = self._call_tiles(batch, todo, cats, cols, fail)
            out.update(tile_scores=tile_scores, tile_maps=tile_maps)
        elif todo:
            def score(rows: list[int]) -> tuple[dict[str, object], float]:
                t0 = time.perf_counter()
                precision.check_injected(STAGE, [np.shape(images[i]) for i in rows])
                result = self.scorer.score_rows([images[i] for i in rows], [cats[i] for i in rows],
                                                [ids[i] for i in rows])
                return result, (time.perf_counter() - t0) * 1000.0 / len(rows)

            try:  # a batch that does not fit in the GPU's memory is split, down to single images
                for rows, done in precision.split_on_oom(score, todo, STAGE, on_split=self._log_split):
                    if isinstance(done, BaseException):
                        fail(rows[0], done)
                    else:
                        store(rows, *done)
            except Exception:  # one bad row must not sink the batch: retry one by one
                for i in todo:
                    try:
                        store([i], *score([i]))
                    except Exception as exc:
                        oom = precision.is_out_of_memory(exc)
                        fail(i, precision.OutOfMemory(f"stage {STAGE}: {exc}") if oom else exc)
            for i in todo:
                if errors.ok(i) and not np.isfinite(cols["score"][i]):
                    fail(i, FloatingPointError(f"non-finite score {cols['score'][i]}"))
                if not errors.ok(i):
                    for key in cols:
                        cols[key][i] = np.nan
                    maps[i] = _NO_MAP
                    few_k[i] = ref_digest[i] = None
                    for col in extras.values():
                        col[i] = None
        if self.tiling is not None and "tile_scores" not in out:
            out.update(_empty_tile_columns(n))
        mode = "tiles" if self.tiling is not None else "whole_image"
        scoring_mode = object_column([mode if errors.ok(i) else None for i in range(n)])
        out.update(cols, anomaly_map=maps, scoring_mode=scoring_mode, few_shot_k=few_k, reference_digest=ref_digest,
                   **extras, **errors.columns())
        loads = self.scorer.loads_column
        if loads:
            out.update({"scorer": object_column([_actor_name()] * n), loads: np.full(n, self.scorer.loads(), np.int64)})
        return out

    def _log_split(self, size: int, half: int) -> None:
        self.oom_splits += 1
        stderr_log(f"{self.name}: out of accelerator memory on {size} images; freed the cache, retrying as "
                   f"{half} + {size - half}")

    def _call_tiles(self, batch, todo, cats, cols, fail):
        """Tiling mode: score every tile of each row (image score + a ``tile_map_size`` square map);
        the aggregation stage turns them into the image's score and map. ``score`` is meanwhile the
        mean tile score and ``score_vision`` the largest tile vision score."""
        if "tiles" not in batch:
            raise ValueError("stage 'clip_score' is in tiling mode but the batch has no 'tiles' column "
                             "(run the tiling stage first)")
        n = len(batch["status"])
        tile_scores, tile_maps = _empty_tile_columns(n).values()
        side = self.tiling.tile_map_size
        for i in todo:
            t0 = time.perf_counter()
            try:
                image = image_at(batch, i)
                boxes = np.asarray(batch["tiles"][i], dtype=np.int64).reshape(-1, 5)
                if not len(boxes):
                    raise ValueError("no tiles planned for this image")
                # tiles are in the original's pixels; an image decoded at a working size is cropped
                # where the tile lies in its own pixels
                pixels = np.asarray(image)
                crops = [pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in (working_box(image, b[1:]) for b in boxes)]
                scores, maps, vision = [], [], []
                def score_tiles(ks: list[int]) -> dict[str, object]:
                    chunk = [crops[k] for k in ks]
                    precision.check_injected(STAGE, [c.shape for c in chunk])
                    return self.scorer.score_images(chunk, [cats[i]] * len(chunk), map_side=side)

                for k in range(0, len(crops), self.tile_batch_size):
                    ks = list(range(k, min(k + self.tile_batch_size, len(crops))))
                    for _, r in precision.split_on_oom(score_tiles, ks, STAGE, on_split=self._log_split):
                        if isinstance(r, BaseException):  # a tile that does not fit alone fails its image
                            raise r
                        scores.append(r["score"])
                        vision.append(r["score_vision"])
                        maps += r["maps"]
                t_scores = np.concatenate(scores)
                if not np.all(np.isfinite(t_scores)):
                    raise FloatingPointError(f"non-finite tile score in {t_scores.tolist()}")
                tile_scores[i] = t_scores
                tile_maps[i] = np.stack(maps).astype(np.float32) if maps else np.zeros((0, side, side), np.float32)
                cols["score"][i] = float(t_scores.mean())
                v = np.concatenate(vision)
                cols["score_vision"][i] = float(np.nanmax(v)) if np.isfinite(v).any() else np.nan
                cols["clip_score_ms"][i] = (time.perf_counter() - t0) * 1000.0
            except Exception as exc:  # noqa: BLE001 - one bad row must not sink the batch
                fail(i, exc)
        return tile_scores, tile_maps


_NO_MAP = np.zeros((0, 0), dtype=np.float32)


def scorer_from_spec(spec, storage: StorageOptions | None = None) -> Scorer:
    """The scorer of ``spec``'s ``score.kind`` (:data:`SCORERS`)."""
    return SCORERS[spec.score.kind](spec, storage)


def _actor_name() -> str:
    """This process as run.json names a scoring actor: host:pid."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _empty_tile_columns(n: int) -> dict[str, np.ndarray]:
    return {"tile_scores": object_column([np.zeros(0, np.float64) for _ in range(n)]),
            "tile_maps": object_column([np.zeros((0, 0, 0), np.float32) for _ in range(n)])}
