"""The Ray side of a run: start or attach to Ray, build the Ray Data plan, stream results back.

This module (with the rest of ``pipeline/runtime/``) is the only code that imports ray, and the
only place that calls ``map_batches``. Minimum Ray version: 2.51 (``compute=ActorPoolStrategy``
with ``min_size``/``max_size``, named resource arguments).

Plan (one row per image throughout):
    manifest blocks -> decode (CPU tasks)
                    [-> foreground (SAM: actor pool, GPU when given; classical: CPU tasks)
                     -> tiling (CPU tasks)]                               with a foreground / tiling section
                    -> clip_score (actor pool, GPU when given; tiles when tiling)
                    [-> aggregate (CPU tasks: tiles -> image score and map)]
                    -> encode (CPU tasks: 16-bit heatmap PNG, RLE) -> driver
The image and float-map columns are dropped before results come back: only scalars and the
compact PNG/RLE bytes reach the driver.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import pandas as pd
import ray
from ray.data import ActorPoolStrategy

from pipeline.config import JobSpec, StageResources
from pipeline.runtime.udf import _ActorStage, _task
from pipeline.io.fs import StorageOptions
from pipeline.stages.aggregate import AggregateStage
from pipeline.stages.clip_score import ClipScoreStage
from pipeline.stages.decode import DecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.foreground import ForegroundStage
from pipeline.stages.tiling import TilingStage

RESULT_COLUMNS = (
    "uri", "image_id", "category", "status", "error_stage", "error_type", "error_message",
    "height", "width", "decode_ms", "score", "score_language", "score_vision", "max_pixel_score",
    "clip_score_ms", "map_png", "map_height", "map_width", "mask_rle", "encode_ms",
)
# with a foreground section (and tiling): the foreground/tiles tables and the scores' new columns
FOREGROUND_COLUMNS = ("fg_rle", "fg_components", "fg_sam_masks", "fg_kept_masks", "foreground_ms")
TILING_COLUMNS = ("tiles", "tile_reasons", "tile_scores", "tile_component_scores", "n_components", "n_tiles",
                  "scoring_mode", "aggregate_ms")


def result_columns(spec: JobSpec) -> list[str]:
    cols = list(RESULT_COLUMNS)
    if spec.foreground is not None:
        cols += FOREGROUND_COLUMNS
    if spec.tiling is not None:
        cols += TILING_COLUMNS
    return cols


def _remote_args(res: StageResources) -> dict[str, Any]:
    args: dict[str, Any] = {"num_cpus": res.num_cpus}
    if res.num_gpus:
        args["num_gpus"] = res.num_gpus
    if res.memory:
        args["memory"] = res.memory
    return args


def effective_gpus(spec: JobSpec, session: dict[str, Any], log: Callable[[str], None], stage: str = "clip_score") -> float:
    """GPUs for a model pool: as the spec asks, except on a local Ray without GPUs, where asking
    for one would wait forever: there it falls back to CPU and says so. On a cluster the request is
    kept (an autoscaler may add GPU nodes)."""
    asked = getattr(spec.resources, stage).num_gpus
    if asked and session["local"] and not session["resources"].get("GPU"):
        log(f"resources.{stage}.num_gpus={asked} but this machine's Ray has no GPU: running {stage} on CPU")
        return 0.0
    return asked


def _actor_args(res: StageResources, gpus: float) -> dict[str, Any]:
    args = _remote_args(res)
    if gpus:
        args["num_gpus"] = gpus
    else:
        args.pop("num_gpus", None)
    return args


def run_plan(
    spec: JobSpec,
    manifest: pd.DataFrame,
    storage: StorageOptions,
    session: dict[str, Any],
    log: Callable[[str], None],
    result_batch_rows: int | None = None,
    on_stats: Callable[[str], None] | None = None,
) -> Iterator[pd.DataFrame]:
    """Execute the plan over ``manifest`` (uri, image_id, category) and yield result batches with
    :data:`RESULT_COLUMNS` as they complete (block by block by default, so progress is timely).
    When the plan is exhausted, ``on_stats`` receives Ray Data's execution statistics."""
    # results come back in input order, so shards complete one after another and the driver
    # buffers at most the shards in flight
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dec_res = spec.resources.decode
    clip_res = spec.resources.clip_score
    gpus = effective_gpus(spec, session, log)
    block_rows = max(1, dec_res.batch_size)
    inputs = manifest[["uri", "image_id", "category"]].reset_index(drop=True)
    blocks = [inputs.iloc[i : i + block_rows] for i in range(0, len(inputs), block_rows)]
    ds = ray.data.from_pandas(blocks)
    ds = ds.map_batches(
        _task(DecodeStage(spec.decode, storage, spec.retries)),
        batch_size=dec_res.batch_size,
        batch_format="numpy",
        **_remote_args(dec_res),
    )
    if spec.foreground is not None:
        fg_res = spec.resources.foreground
        fg_gpus = effective_gpus(spec, session, log, "foreground") if spec.uses_sam() else 0.0
        fg_stage = functools.partial(ForegroundStage, spec.foreground, spec.sam, weights_cache=spec.weights_cache,
                                     storage=storage, use_gpu=fg_gpus > 0, retries=spec.retries)
        if spec.uses_sam():  # a model: an actor pool, the model built once per actor
            ds = ds.map_batches(
                _ActorStage, fn_constructor_kwargs={"factory": fg_stage},
                compute=ActorPoolStrategy(min_size=fg_res.min_actors, max_size=fg_res.max_actors),
                batch_size=fg_res.batch_size, batch_format="numpy", **_actor_args(fg_res, fg_gpus),
            )
        else:  # classical map or none: plain CPU tasks
            ds = ds.map_batches(_task(fg_stage()), batch_size=fg_res.batch_size, batch_format="numpy", **_remote_args(fg_res))
    if spec.tiling is not None:
        ds = ds.map_batches(_task(TilingStage(spec.tiling)), batch_size=dec_res.batch_size, batch_format="numpy",
                            **_remote_args(dec_res))
    factory = functools.partial(
        ClipScoreStage,
        spec.clip,
        spec.score,
        weights_cache=spec.weights_cache,
        storage=storage,
        pixel=spec.pixel,
        maps=spec.maps,
        use_gpu=gpus > 0,
        retries=spec.retries,
        tiling=spec.tiling,
    )
    clip_args = _actor_args(clip_res, gpus)
    ds = ds.map_batches(
        _ActorStage,
        fn_constructor_kwargs={"factory": factory},
        compute=ActorPoolStrategy(min_size=clip_res.min_actors, max_size=clip_res.max_actors),
        batch_size=clip_res.batch_size,
        batch_format="numpy",
        **clip_args,
    )
    if spec.tiling is not None:
        ds = ds.map_batches(_task(AggregateStage(spec.aggregation, spec.maps)), batch_size=dec_res.batch_size,
                            batch_format="numpy", **_remote_args(dec_res))
    ds = ds.map_batches(
        _task(EncodeStage(threshold=spec.maps.threshold)),
        batch_size=dec_res.batch_size,
        batch_format="numpy",
        **_remote_args(dec_res),
    )
    ds = ds.select_columns(result_columns(spec))
    yield from ds.iter_batches(batch_size=result_batch_rows, batch_format="pandas")
    if on_stats is not None:
        try:
            on_stats(ds.stats())
        except Exception as exc:  # stats are diagnostics: never fail a finished run over them
            log(f"could not collect Ray Data stats: {exc}")
