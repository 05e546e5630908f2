"""The plan: the ordered list of stages a job runs, built from its JobSpec by :func:`build_plan`.

Each stage is a class of :mod:`pipeline.stages` that follows :class:`pipeline.stages.base.Stage`:
its ``from_spec`` returns the configured stage, or None when the job does not use it. The order
below is the one declaration a new stage adds; :mod:`pipeline.runtime.ray_plan` turns the built
list into Ray Data ``map_batches`` calls and nothing else decides what runs.

Column contracts are checked here, before anything runs: every column a stage requires must come
from the input manifest or an earlier stage, and every column an output table reads must exist at
the end of the plan (or the table's contract must allow it to be null).

Plan of a job with every section (one row per image throughout)::

    inputs.parquet rows (uri, image_id, category, gt_label, mask_uri, size, mtime, etag)
      -> decode       task   image, height, width, status, error_*, decode_ms
      -> foreground   actor (SAM) or task (classical/none)   fg_rle, fg_components, fg_*_masks, foreground_ms
      -> tiling       task   tiles, tile_reasons
      -> clip_score   actor  score, score_vision, max_pixel_score, anomaly_map, scoring_mode, clip_score_ms
                             (+ tile_scores, tile_maps when tiling; + score_mutual, image_embedding
                             for mutual scoring, whose scorer is MutualScorer)
      -> aggregate    task   score, anomaly_map, max_pixel_score, n_tiles, scoring_mode, ...  (drops tile_maps)
      -> sam_refine   actor  anomaly_map, max_pixel_score, refined, refine_rle, refine_info, sam_refine_ms
      -> encode       task   map_png, map_height, map_width, mask_rle, threshold, encode_ms  (drops anomaly_map)
      -> driver: each output table is one projection of the row (pipeline.io.projection)

With ``runtime.fuse_models: true`` the model stages and the stages between them (foreground ..
sam_refine) become one actor stage, ``models`` (:mod:`pipeline.stages.fused`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

from pipeline.config import JobSpec, StageResources
from pipeline.errors import ZsadError
from pipeline.io.fs import StorageOptions
from pipeline.stages.aggregate import AggregateStage
from pipeline.stages.base import STAGE_KINDS, PlannedStage, Stage
from pipeline.stages.clip_score import ClipScoreStage
from pipeline.stages.decode import DecodeStage, DeviceDecodeStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.foreground import ForegroundStage
from pipeline.stages.fused import FusedStage, fuse
from pipeline.stages.sam_refine import SamRefineStage
from pipeline.stages.tiling import TilingStage

#: The order of the stages. A new stage is one module, its spec section and one entry here.
STAGE_ORDER: tuple[type, ...] = (DecodeStage, ForegroundStage, TilingStage, ClipScoreStage, AggregateStage,
                                 SamRefineStage, EncodeStage)


class PlanError(ZsadError, ValueError):
    """A plan that cannot run; raised when it is built, before any data moves."""


def build_plan(spec: JobSpec, storage: StorageOptions | None = None, *, source: Iterable[str] = (),
               outputs: dict[str, tuple[set[str], set[str]]] | None = None,
               order: Iterable[type] | None = None) -> list[PlannedStage]:
    """The ordered stages of ``spec``, checked.

    ``source``: the columns every row starts with (the input manifest's). ``outputs``: table ->
    (columns it must find, columns it may find: absent ones are stored as null), from
    :func:`pipeline.io.projection.needs`; checked against the columns at the end of the plan.

    Raises :class:`PlanError` for a stage of unknown kind, a stage without its resources section,
    a required column that no earlier stage produces, or an output column nothing produces.
    ``order``: the stage classes to try (default: :data:`STAGE_ORDER`, read when called)."""
    planned = []
    for cls in STAGE_ORDER if order is None else order:
        stage = cls.from_spec(spec, storage)
        if stage is None:
            continue
        if stage.kind not in STAGE_KINDS:
            raise PlanError(f"stage {stage.name!r} has unknown kind {stage.kind!r} (known: {', '.join(STAGE_KINDS)})")
        resources = getattr(spec.resources, stage.name, None)
        if not isinstance(resources, StageResources):
            raise PlanError(f"stage {stage.name!r} has no resources section (resources.{stage.name} in the job spec)")
        planned.append(PlannedStage(stage, resources))
    planned = share_optional(planned)
    if spec.runtime.fuse_models:  # one actor pool for the model stages (pipeline.stages.fused)
        planned = fuse(planned)
    device_decode = DeviceDecodeStage.from_spec(spec, storage)
    if device_decode is not None:  # decode.device: model
        planned = decode_in_model(planned, device_decode)
    final = check_columns(planned, source) | set(column_defaults(planned))
    for table, (required, _) in (outputs or {}).items():
        missing = sorted(required - final)
        if missing:
            raise PlanError(f"table {table!r} needs column(s) {', '.join(missing)} that no stage of this plan produces "
                            f"(plan: {' -> '.join(p.name for p in planned)})")
    return planned


def decode_in_model(planned: list[PlannedStage], stage: Any) -> list[PlannedStage]:
    """``planned`` with ``stage`` (:class:`~pipeline.stages.decode.DeviceDecodeStage`) run first in
    the actor of the stage after decode, which keeps its name and resources
    (:class:`~pipeline.stages.fused.FusedStage`). Raises :class:`PlanError` when that stage is not
    a model actor."""
    names = [p.name for p in planned]
    at = names.index(DecodeStage.name) + 1 if DecodeStage.name in names else 0
    after = planned[at] if at < len(planned) else None
    if after is None or after.kind != "actor":
        what = f"{after.name!r}, a CPU task" if after is not None else "nothing"
        raise PlanError(f"decode.device: model decodes in the model actor after the decode stage, but that stage is "
                        f"{what} (plan: {' -> '.join(names)}); use decode.device: cpu")
    parts = after.stage.parts if isinstance(after.stage, FusedStage) else [after.stage]
    fused = replace(after, stage=FusedStage([stage, *parts], name=after.name))
    return [*planned[:at], fused, *planned[at + 1:]]


def column_defaults(planned: list[PlannedStage]) -> dict[str, tuple[Any, Any]]:
    """Columns of the stages a plan does not run that still have a value in every row (a stage's
    ``defaults``: sam_refine's ``refined`` is False in a plan without it): column -> (type, value).
    The driver adds them to the result rows; no other stage writes them on the absent stage's behalf."""
    names: set[str] = set()
    have: set[str] = set()
    for p in planned:
        names |= {s.name for s in (getattr(p.stage, "parts", None) or [p.stage])}
        have |= set(p.stage.produces)
    out: dict[str, tuple[Any, Any]] = {}
    for cls in STAGE_ORDER:
        if cls.name not in names:
            out.update({c: (cls.types[c], v) for c, v in getattr(cls, "defaults", {}).items() if c not in have})
    return out


def share_optional(planned: list[PlannedStage]) -> list[PlannedStage]:
    """Optional columns: a stage that ``offers`` columns adds those a later stage ``uses``
    (``offering(columns)``), and that stage reads them (``using(columns)``); a stage never asks
    which other stages the job has."""
    out = list(planned)
    for i, p in enumerate(out):
        offered = set(getattr(p.stage, "offers", ()))
        users = [j for j in range(i + 1, len(out)) if offered & set(getattr(out[j].stage, "uses", ()))]
        if not users:
            continue
        wanted = offered & {c for j in users for c in out[j].stage.uses}
        out[i] = replace(p, stage=p.stage.offering(wanted))
        for j in users:
            out[j] = replace(out[j], stage=out[j].stage.using(wanted & set(out[j].stage.uses)))
    return out


def with_inputs(planned: list[PlannedStage], inputs: dict[str, Any]) -> list[PlannedStage]:
    """``planned`` with ``inputs`` (name -> value, from the passes before the plan) given to the
    stages that declare them (a stage's ``inputs``: the names its ``setup`` takes).

    Raises :class:`PlanError` for an input no stage of the plan takes."""
    left = dict(inputs)
    out = []
    for p in planned:
        names = set(getattr(p.stage, "inputs", ()))
        mine = {k: v for k, v in inputs.items() if k in names}
        for k in mine:
            left.pop(k, None)
        out.append(replace(p, inputs={**p.inputs, **mine}) if mine else p)
    if left:
        raise PlanError(f"no stage of the plan takes input(s) {', '.join(sorted(left))} "
                        f"(plan: {' -> '.join(p.name for p in planned)})")
    return out


def check_columns(planned: list[PlannedStage] | list[Stage], source: Iterable[str]) -> set[str]:
    """Walk the plan: each stage's required columns must exist when it runs. Returns the columns
    at the end of the plan."""
    have = set(source)
    for item in planned:
        stage = item.stage if isinstance(item, PlannedStage) else item
        missing = [c for c in stage.requires if c not in have]
        if missing:
            raise PlanError(
                f"stage {stage.name!r} requires column(s) {', '.join(map(repr, missing))} that no earlier stage "
                f"produces (available: {', '.join(sorted(have))})"
            )
        if set(stage.produces) != set(stage.types):
            raise PlanError(f"stage {stage.name!r} declares types for {sorted(stage.types)} but produces "
                            f"{list(stage.produces)}")
        have |= set(stage.produces)
        have -= set(stage.drops)
    return have
