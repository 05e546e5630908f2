"""Typed job specification.

A job spec is a YAML file validated into :class:`JobSpec` (pydantic v2, frozen, unknown keys
rejected). ``--set dotted.key=value`` overrides are applied to the raw YAML mapping before
validation, so an override of a misspelled key fails exactly like the same key in the file.

Every field has a documented default; ``zsad validate JOB...`` checks files without running them.
One module per spec section (``clip``, ``score``, ``pixel``, ...), :mod:`pipeline.config.job` for
the whole job, :mod:`pipeline.config.train` for training specs and :mod:`pipeline.config.load`
for reading files and ``--set`` overrides; every public name is re-exported here.
"""

from pipeline.config.base import CacheDir, SpecError, SpecModel, WeightsSpec
from pipeline.config.clip import ClipSpec, Precision
from pipeline.config.data import DataSpec, DecodeSpec, StorageSpec
from pipeline.config.few_shot import FEW_SHOT_PIXEL, FewShotSpec
from pipeline.config.foreground import AggregationSpec, ForegroundSpec, TilingSpec
from pipeline.config.job import KIND_SECTIONS, JobSpec
from pipeline.config.load import (
    TINY_CLIP,
    TINY_IMAGE_SIZE,
    TINY_LAYERS,
    apply_overrides,
    is_training_spec,
    load_spec,
    parse_override,
    spec_from_dict,
    tiny_overrides,
)
from pipeline.config.mutual import MutualSpec
from pipeline.config.outputs import MapOutputSpec, ReportSpec
from pipeline.config.pixel import (
    AprilGanAdapters,
    ClipSegMaps,
    FadeZeroShot,
    MutualMaps,
    NoPixelMap,
    PixelSpec,
    WinclipWindows,
)
from pipeline.config.resources import ResourcesSpec, RetrySpec, RuntimeSpec, StageResources
from pipeline.config.sam import SamRefineSpec, SamSpec
from pipeline.config.score import (
    Aggregation,
    MutualImageScore,
    ObjectNameSpec,
    PromptFileSpec,
    PromptSetName,
    ScoreSpec,
    ZeroShotImageScore,
)
from pipeline.config.train import TrainingSpec, TrainSpec

__all__ = [
    "FEW_SHOT_PIXEL", "KIND_SECTIONS", "TINY_CLIP", "TINY_IMAGE_SIZE", "TINY_LAYERS", "Aggregation", "AggregationSpec",
    "AprilGanAdapters", "CacheDir", "ClipSegMaps", "ClipSpec", "DataSpec", "DecodeSpec", "FadeZeroShot", "FewShotSpec",
    "ForegroundSpec", "JobSpec", "MapOutputSpec", "MutualImageScore", "MutualMaps", "MutualSpec", "NoPixelMap",
    "ObjectNameSpec", "PixelSpec", "Precision", "PromptFileSpec", "PromptSetName", "ReportSpec", "ResourcesSpec",
    "RetrySpec", "RuntimeSpec", "SamRefineSpec", "SamSpec", "ScoreSpec", "SpecError", "SpecModel", "StageResources",
    "StorageSpec", "TilingSpec", "TrainSpec", "TrainingSpec", "WeightsSpec", "WinclipWindows", "ZeroShotImageScore",
    "apply_overrides", "is_training_spec", "load_spec", "parse_override", "spec_from_dict", "tiny_overrides",
]
