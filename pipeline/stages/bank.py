"""Bank stage: the few-shot reference images -> their memory-bank features (METHODS.md section 4).

Runs before the images are scored, as its own pass over the chosen reference images
(``RUN/references.parquet``): decode (CPU tasks) -> this stage, an actor pool with the CLIP stage's
resources (``resources.clip_score``: GPU when given) that builds the SAME scoring stage
(:class:`pipeline.stages.clip_score.ClipScoreStage`) and asks it for
:meth:`~pipeline.stages.clip_score.ClipScoreStage.bank_features`, the features its few-shot scorer
compares queries with. Bank and query features therefore come from one piece of code. Each row gets
``bank_features`` (the image's features as safetensors bytes); the driver stacks them per category in
shot order and writes ``RUN/banks/<category>.safetensors`` (:mod:`pipeline.io.banks`).

:func:`bank_digest` names what a bank was built from (model, method settings, references); a bank
file is only used when its digest is the expected one.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobSpec
from pipeline.io.fs import StorageOptions
from pipeline.stages.base import check_columns
from pipeline.stages.clip_score import ClipScoreStage
from pipeline.stages.records import RowErrors, object_column

STAGE = "bank"


def bank_settings(spec: JobSpec) -> dict[str, Any]:
    """What a bank's features depend on: the CLIP model and its input handling, the method and
    the pixel settings that shape its features (as plain data)."""
    clip = spec.clip
    pixel = spec.pixel.model_dump(mode="json")
    keep = {"winclip_windows": ("window_sizes",), "april_gan": ("layers", "image_size", "weights"),
            "fade_zero_shot": ("scales", "gem_depth"), "mutual": ("layers", "image_size")}[spec.pixel.kind]
    return {
        "method": "mutual" if spec.mutual is not None else spec.few_shot_method(),
        "clip": {"model": clip.model, "weights": clip.weights.describe() if clip.weights else "random",
                 "image_size": clip.image_size, "resize": clip.resize, "activation": clip.activation,
                 "precision": clip.precision, "cpu_int8": clip.cpu_int8},
        "pixel": {"kind": spec.pixel.kind, **{k: pixel[k] for k in keep}},
        "vision_features": spec.few_shot.vision_features if spec.few_shot_method() == "fade" else None,
        **({"pool_format": "standardised block tokens + unit embedding"} if spec.mutual is not None else {}),
    }


def bank_digest(spec: JobSpec, reference_digest: str, k: int) -> str:
    """sha256 of the bank's settings (:func:`bank_settings`), its references' digest and k."""
    text = json.dumps({"settings": bank_settings(spec), "references": reference_digest, "k": k}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def pack_features(features: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in features.items()})


def unpack_features(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


class BankStage:
    """Batch callable: adds ``bank_features`` (binary, the row's features packed with
    :func:`pack_features`; null for failed rows) and ``bank_ms``."""

    name = STAGE
    section = "clip"
    kind = "actor"
    requires = ("image", "category", "status", "error_stage", "error_type", "error_message")
    drops: tuple[str, ...] = ()
    types = {"bank_features": pa.binary(), "bank_ms": pa.float64(), "status": pa.string(), "error_stage": pa.string(),
             "error_type": pa.string(), "error_message": pa.string()}
    produces = tuple(types)

    def __init__(self, scorer: ClipScoreStage) -> None:
        self.scorer = scorer

    @classmethod
    def from_spec(cls, spec: JobSpec, storage: StorageOptions | None = None) -> "BankStage | None":
        if spec.mutual is not None:  # the pool pass of mutual scoring: the same features as its queries
            from pipeline.stages.mutual_score import MutualScoreStage

            return cls(MutualScoreStage.from_spec(spec, storage))
        if spec.few_shot is None:
            return None
        return cls(ClipScoreStage.from_spec(spec, storage))

    @property
    def use_gpu(self) -> bool:
        return self.scorer.use_gpu

    @use_gpu.setter
    def use_gpu(self, value: bool) -> None:
        self.scorer.use_gpu = value

    def setup(self) -> None:
        self.scorer.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        self.setup()
        out = dict(batch)
        errors = RowErrors(batch, n)
        packed = object_column([None] * n)
        ms = np.full(n, np.nan)
        for i in range(n):  # one image at a time: a reference that fails is named alone
            if not errors.ok(i):
                continue
            t0 = time.perf_counter()
            try:
                packed[i] = pack_features(self.scorer.bank_features([batch["image"][i]])[0])
            except Exception as exc:  # noqa: BLE001 - the driver reports the failed reference by name
                errors.fail_with(i, STAGE, exc, "bank features failed")
            ms[i] = (time.perf_counter() - t0) * 1000.0
        out.update(bank_features=packed, bank_ms=ms, **errors.columns())
        return out
