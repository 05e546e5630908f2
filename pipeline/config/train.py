"""A training job (``zsad train``): :class:`TrainSpec` and its ``train`` section."""

from __future__ import annotations

import math
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import CacheDir, SpecModel, redacted_data
from pipeline.config.clip import ClipSpec
from pipeline.config.data import DataSpec, DecodeSpec, StorageSpec
from pipeline.config.pixel import AprilGanAdapters
from pipeline.config.resources import ResourcesSpec, RetrySpec
from pipeline.config.score import ObjectNameSpec, ZeroShotImageScore


class TrainingSpec(SpecModel):
    """How the adapters are trained (APRIL-GAN, METHODS.md section 3): frozen CLIP; per layer focal
    (gamma 2) + binary dice loss on the layer's map, summed; Adam with ``learning_rate`` and
    ``betas``; ``batch_size`` images per step and worker; ``epochs`` passes over the data;
    ``mosaic_probability``: the chance that a training image is replaced by a 2 x 2 mosaic of four
    images of its category (with their masks); ``seed`` fixes the adapters' initialisation, the
    order and the mosaics.

    Ray Train: ``num_workers`` data-parallel workers, each asking Ray for ``resources_per_worker``
    (e.g. ``{CPU: 4, GPU: 1}``; the GPU count defaults to 1 when a GPU is used). ``use_gpu``:
    ``auto`` (default) trains on GPUs where the Ray session can have them (a cluster, or a local
    Ray with a GPU) and on the CPU of a local Ray without one, saying so; ``true`` always asks for
    GPUs (on a local Ray without one: refused at once, exit 2); ``false`` never does. On a local Ray
    a request that the machine can never satisfy is refused at once (exit 2, naming these keys); on
    a cluster the command waits for the workers, says every minute what it waits for and what the
    cluster has, and gives up after ``start_timeout_s`` seconds (exit 1). ``max_failures``: how
    many times Ray Train restarts failed workers (from the last finished epoch's checkpoint)
    before the training fails; never unbounded."""

    epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    mosaic_probability: float = Field(default=0.2, ge=0, le=1)
    num_workers: int = Field(default=1, ge=1)
    use_gpu: Union[bool, Literal["auto"]] = "auto"
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    start_timeout_s: float = Field(default=1800.0, gt=0)
    max_failures: int = Field(default=1, ge=0)

    @field_validator("resources_per_worker")
    @classmethod
    def _amounts(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not (v >= 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"resource amounts must be finite numbers >= 0, got {bad}")
        return value

    @model_validator(mode="after")
    def _gpu_agrees(self) -> "TrainingSpec":
        gpus = self.resources_per_worker.get("GPU")
        if self.use_gpu is False and gpus:
            raise ValueError(f"use_gpu is false but resources_per_worker asks for GPU: {gpus:g}; set use_gpu: auto "
                             "(or true), or remove GPU from resources_per_worker")
        if self.use_gpu is True and gpus == 0:
            raise ValueError("use_gpu is true but resources_per_worker has GPU: 0; set use_gpu: false, or ask for GPUs")
        return self


class TrainSpec(SpecModel):
    """A training job (``zsad train``): adapters for ``pixel.kind: april_gan``.

    ``clip``: the frozen backbone (with ``activation``); ``score``: the prompts whose two text
    vectors the maps are trained against (APRIL-GAN's set by default); ``adapters``: the layers and
    input size, and ``weights`` to start from (``null``: random initialisation with ``train.seed``);
    ``data``: how the labelled input is listed (a layout with masks: mvtec, visa, manifest with
    ``mask_uri``). ``allow_random_weights`` applies to CLIP's weights only."""

    name: str = "train-adapters"
    clip: ClipSpec
    score: ZeroShotImageScore = ZeroShotImageScore(prompt_set="april_gan", aggregation="mean_norm_renorm",
                                                   object_names=ObjectNameSpec(policy="raw"))
    adapters: AprilGanAdapters = AprilGanAdapters()
    train: TrainingSpec = TrainingSpec()
    allow_random_weights: bool = False
    data: DataSpec = DataSpec()
    decode: DecodeSpec = DecodeSpec()
    storage: StorageSpec = StorageSpec()
    resources: ResourcesSpec = ResourcesSpec()
    retries: RetrySpec = RetrySpec()
    weights_cache: CacheDir = None

    @model_validator(mode="after")
    def _random_weights_gate(self) -> "TrainSpec":
        if self.clip.weights is None and not self.allow_random_weights:
            raise ValueError("clip.weights is null, which means random initialisation: adapters trained on a "
                             "random CLIP are meaningless. Give a weights spec, or set allow_random_weights: true "
                             "(tests only)")
        return self

    @property
    def random_weights(self) -> bool:
        return self.clip.weights is None

    def redacted(self) -> dict[str, Any]:
        return redacted_data(self)
