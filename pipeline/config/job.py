"""A whole job (:class:`JobSpec`): its sections, their defaults and the checks across sections."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from pipeline.config.base import CacheDir, SpecModel, redacted_data
from pipeline.config.clip import ClipSpec
from pipeline.config.data import DataSpec, DecodeSpec, StorageSpec
from pipeline.config.few_shot import FEW_SHOT_PIXEL, FewShotSpec
from pipeline.config.foreground import AggregationSpec, ForegroundSpec, TilingSpec
from pipeline.config.mutual import MutualSpec
from pipeline.config.outputs import MapOutputSpec, ReportSpec
from pipeline.config.pixel import AprilGanAdapters, ClipSegMaps, MutualMaps, NoPixelMap, PixelSpec
from pipeline.config.resources import ResourcesSpec, RetrySpec, RuntimeSpec
from pipeline.config.sam import SamRefineSpec, SamSpec
from pipeline.config.score import ScoreSpec, ZeroShotImageScore

#: Sections whose model is chosen by ``kind`` (a discriminated union): each kind has its own keys.
KIND_SECTIONS: tuple[str, ...] = ("score", "pixel")


class JobSpec(SpecModel):
    """A whole job. See ``jobs/*.yaml`` for the presets and README for every key."""

    name: str = "zsad-job"
    clip: ClipSpec
    score: ScoreSpec = ZeroShotImageScore()
    pixel: PixelSpec = NoPixelMap()
    maps: MapOutputSpec = MapOutputSpec()
    allow_random_weights: bool = False
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    shard_size: int = Field(default=1000, ge=1)
    skip_scored: str | None = None
    stall_timeout_s: float | None = Field(default=1800.0, gt=0)
    # a run lease whose heartbeat is older is stale (resume may take it over)
    lease_timeout_s: float = Field(default=3600.0, gt=0)
    data: DataSpec = DataSpec()
    decode: DecodeSpec = DecodeSpec()
    storage: StorageSpec = StorageSpec()
    few_shot: FewShotSpec | None = None
    mutual: MutualSpec | None = None
    sam: SamSpec | None = None
    foreground: ForegroundSpec | None = None
    tiling: TilingSpec | None = None
    sam_refine: SamRefineSpec | None = None
    aggregation: AggregationSpec = AggregationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    retries: RetrySpec = RetrySpec()
    report: ReportSpec = ReportSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    weights_cache: CacheDir = None

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        """A per-kind section given without ``kind`` (``score: {prompt_set: vvv}``) takes the
        section's default kind, as documented."""
        if isinstance(data, dict) and isinstance(data.get("pixel"), dict) and data["pixel"].get("kind") == "mutual":
            # MuSc: its score and mutual sections follow from the pixel kind when not given
            data = {**data, "score": data.get("score") or {"kind": "mutual"},
                    "mutual": data["mutual"] if data.get("mutual") is not None else {}}
        if isinstance(data, dict):
            for section in KIND_SECTIONS:
                value = data.get(section)
                if isinstance(value, dict) and "kind" not in value:
                    data = {**data, section: {"kind": cls.model_fields[section].default.kind, **value}}
        return data

    @model_validator(mode="after")
    def _random_weights_gate(self) -> "JobSpec":
        for key in self.random_models():
            if not self.allow_random_weights:
                raise ValueError(
                    f"{key} is null, which means random initialisation; scores from random weights "
                    "are meaningless. Give a weights spec (a path or a URI; for CLIP also an open_clip "
                    "pretrained tag), or set allow_random_weights: true (tests/benchmarks only; the "
                    "run is marked random)"
                )
        return self

    @model_validator(mode="after")
    def _stages_fit(self) -> "JobSpec":
        if self.tiling is not None and self.foreground is None:
            raise ValueError("tiling needs a foreground section (foreground.kind: sam_dis, classical or none)")
        if self.foreground is not None and self.foreground.kind == "sam_dis" and self.sam is None:
            raise ValueError("foreground.kind sam_dis needs a sam section (sam.model, sam.weights)")
        if self.sam_refine is not None and self.sam is None:
            raise ValueError("sam_refine needs a sam section (sam.model, sam.weights)")
        if self.sam_refine is not None and isinstance(self.pixel, NoPixelMap):
            raise ValueError("sam_refine refines a pixel map: set pixel.kind (e.g. april_gan or fade_zero_shot)")
        if self.tiling is not None and isinstance(self.pixel, AprilGanAdapters):
            raise ValueError("pixel.kind april_gan does not run per tile yet: remove the tiling section")
        mutual = {"pixel.kind": self.pixel.kind == "mutual", "score.kind": self.score.kind == "mutual",
                  "the mutual section": self.mutual is not None}
        if any(mutual.values()) and not all(mutual.values()):
            have = ", ".join(k for k, v in mutual.items() if v)
            lack = ", ".join(k for k, v in mutual.items() if not v)
            raise ValueError("mutual scoring (MuSc) needs pixel.kind: mutual, score.kind: mutual and a mutual "
                             f"section; this spec has {have} but not {lack}")
        if self.mutual is not None:
            if self.few_shot is not None:
                raise ValueError("mutual scoring compares the input's own images: remove the few_shot section")
            if self.tiling is not None:
                raise ValueError("mutual scoring does not run per tile: remove the tiling section")
        if self.few_shot is not None:
            methods = {v: k for k, v in FEW_SHOT_PIXEL.items()}
            if self.pixel.kind not in methods:
                raise ValueError("few_shot needs a pixel method it completes (pixel.kind: "
                                 f"{', '.join(FEW_SHOT_PIXEL.values())}); pixel.kind is {self.pixel.kind}")
            if self.few_shot.method is not None and FEW_SHOT_PIXEL[self.few_shot.method] != self.pixel.kind:
                raise ValueError(f"few_shot.method {self.few_shot.method} completes pixel.kind "
                                 f"{FEW_SHOT_PIXEL[self.few_shot.method]}, but pixel.kind is {self.pixel.kind}")
            if self.tiling is not None:
                raise ValueError("few_shot does not run per tile yet: remove the tiling section")
        return self

    def few_shot_method(self) -> str | None:
        """``winclip``, ``april_gan`` or ``fade`` when the job scores few-shot, else None."""
        if self.few_shot is None:
            return None
        return self.few_shot.method or {v: k for k, v in FEW_SHOT_PIXEL.items()}[self.pixel.kind]

    def uses_sam(self) -> bool:
        return (self.foreground is not None and self.foreground.kind == "sam_dis") or self.sam_refine is not None

    def random_models(self) -> list[str]:
        """The spec keys of models that would run with random weights."""
        keys = ["clip.weights"] if self.clip.weights is None else []
        if self.uses_sam() and self.sam is not None and self.sam.weights is None:
            keys.append("sam.weights")
        if isinstance(self.pixel, (ClipSegMaps, AprilGanAdapters)) and self.pixel.weights is None:
            keys.append("pixel.weights")
        return keys

    def map_range(self) -> tuple[float, float]:
        """The fixed range the pixel maps are stored on (16-bit PNG levels, evaluation): [0, 1] for
        probabilities, [0, number of layers] for APRIL-GAN's summed layer maps ([0, 3 x layers] few-shot:
        each layer adds its nearest-neighbour distance 1 - cos, at most 2)."""
        if isinstance(self.pixel, MutualMaps):  # distances between unit vectors
            return 0.0, 2.0
        if isinstance(self.pixel, AprilGanAdapters):  # few-shot adds up to 2 (1 - cos) per layer
            return 0.0, float(len(self.pixel.layers) * (3 if self.few_shot is not None else 1))
        return 0.0, 1.0

    @property
    def random_weights(self) -> bool:
        return bool(self.random_models())

    def redacted(self) -> dict[str, Any]:
        """The resolved spec as plain data with secrets removed (for run.json)."""
        return redacted_data(self)
