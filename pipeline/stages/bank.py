"""Bank stage: the few-shot reference images -> their memory-bank features (METHODS.md section 4).

Runs before the images are scored, as its own pass over the chosen reference images
(``RUN/references.parquet``): decode (CPU tasks) -> this stage, an actor pool with the CLIP stage's
resources (``resources.clip_score``: GPU when given) that builds the SAME scorer as the scoring
stage (:func:`pipeline.stages.clip_score.scorer_from_spec`) and asks it for ``bank_features``, the
features it compares queries with. Bank and query features therefore come from one piece of code. The actor
writes each batch's features itself, one part file per category into ``RUN/banks/<category>/``
(``RUN/pools/`` for mutual scoring; :mod:`pipeline.io.banks`), and each row hands the driver only
the part's name, byte count and sha256: the driver writes the category's manifest from them.

:func:`bank_digest` names what a bank was built from (model, resolved precision, method settings,
references); a bank is only used when its digest is the expected one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobSpec
from pipeline.io.fs import StorageOptions
from pipeline.stages.base import check_columns
from pipeline.stages.clip_score import Scorer, scorer_from_spec
from pipeline.stages.records import RowErrors, each_row, object_column

STAGE = "bank"


def resolved_precision(spec: JobSpec, gpu: bool) -> str:
    """``clip.precision`` as the model actors resolve it (:func:`pipeline.models.precision.resolve`),
    predicted without torch: ``auto`` is bf16 on a GPU and fp32 on a CPU; fp16 on a CPU is fp32.
    (A GPU without bf16 resolves ``auto`` to fp32: the pass then stops and says so.)"""
    p = spec.clip.precision
    if p == "auto":
        return "bf16" if gpu else "fp32"
    if p == "fp16" and not gpu:
        return "fp32"
    return p


def bank_settings(spec: JobSpec, precision: str | None = None) -> dict[str, Any]:
    """What a bank's features depend on: the CLIP model and its input handling, the precision the
    actors resolve (``precision``; the spec's own value when not given), the method, the pixel
    settings that shape its features and the stored dtype (as plain data)."""
    clip = spec.clip
    pixel = spec.pixel.model_dump(mode="json")
    keep = {"winclip_windows": ("window_sizes",), "april_gan": ("layers", "image_size", "weights"),
            "fade_zero_shot": ("scales", "gem_depth"), "mutual": ("layers", "image_size")}[spec.pixel.kind]
    return {
        "method": "mutual" if spec.mutual is not None else spec.few_shot_method(),
        "clip": {"model": clip.model, "weights": clip.weights.describe() if clip.weights else "random",
                 "image_size": clip.image_size, "resize": clip.resize, "activation": clip.activation,
                 "precision": precision or clip.precision, "cpu_int8": clip.cpu_int8},
        "pixel": {"kind": spec.pixel.kind, **{k: pixel[k] for k in keep}},
        "vision_features": spec.few_shot.vision_features if spec.few_shot_method() == "fade" else None,
        **({"pool_format": "standardised block tokens + unit embedding", "pool_dtype": spec.mutual.pool_dtype}
           if spec.mutual is not None else {}),
    }


def bank_digest(spec: JobSpec, reference_digest: str, k: int, precision: str | None = None) -> str:
    """sha256 of the bank's settings (:func:`bank_settings`, with the resolved ``precision``), its
    references' digest and k."""
    text = json.dumps({"settings": bank_settings(spec, precision), "references": reference_digest, "k": k},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class BankTarget:
    """Where the bank stage writes: the run folder, ``banks`` or ``pools``, each category's digest
    and the stored dtype."""

    run_dir: str
    folder: str
    digests: dict[str, str]
    dtype: str = "float32"


#: the columns the bank stage hands the driver: metadata only, never features
RESULT_COLUMNS = ("image_id", "category", "uri", "status", "error_stage", "error_type", "error_message", "bank_part",
                  "bank_part_bytes", "bank_part_sha256", "bank_precision")


class BankStage:
    """Batch callable: computes each ok row's features, writes them, one part file per category of
    the batch, into the category's folder (:func:`pipeline.io.banks.write_part`), and adds only
    metadata: ``bank_part`` (the part's name), ``bank_part_bytes``, ``bank_part_sha256``,
    ``bank_precision`` (what the forward pass resolved) and ``bank_ms``. The image is dropped."""

    name = STAGE
    section = "clip"
    kind = "actor"
    requires = ("image", "image_id", "category", "status", "error_stage", "error_type", "error_message")
    drops: tuple[str, ...] = ("image",)
    types = {"bank_part": pa.string(), "bank_part_bytes": pa.int64(), "bank_part_sha256": pa.string(),
             "bank_precision": pa.string(), "bank_ms": pa.float64(), "status": pa.string(), "error_stage": pa.string(),
             "error_type": pa.string(), "error_message": pa.string()}
    produces = tuple(types)

    def __init__(self, scorer: Scorer, target: BankTarget | None = None) -> None:
        self.scorer = scorer
        self.target = target

    @classmethod
    def from_spec(cls, spec: JobSpec, storage: StorageOptions | None = None,
                  target: BankTarget | None = None) -> "BankStage | None":
        if spec.mutual is None and spec.few_shot is None:
            return None
        # the scorer of the scoring stage (mutual: the pool pass): the same features as its queries
        return cls(scorer_from_spec(spec, storage), target)

    @property
    def use_gpu(self) -> bool:
        return self.scorer.use_gpu

    @use_gpu.setter
    def use_gpu(self, value: bool) -> None:
        self.scorer.use_gpu = value

    def setup(self) -> None:
        self.scorer.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.io.banks import category_dir, write_part

        if self.target is None:
            raise RuntimeError("the bank stage needs its target (run folder, digests) from the driver")
        n = check_columns(STAGE, batch, self.requires)
        self.setup()
        out = {k: v for k, v in batch.items() if k not in self.drops}
        errors = RowErrors(batch, n)
        part = object_column([None] * n)
        sha = object_column([None] * n)
        size = np.zeros(n, dtype=np.int64)
        ms = np.full(n, np.nan)
        features: dict[str, list[tuple[int, dict[str, np.ndarray]]]] = {}

        def row(i: int) -> None:  # one image at a time: a reference that fails is named alone
            feats = self.scorer.bank_features([batch["image"][i]])[0]
            features.setdefault(str(batch["category"][i]), []).append((i, feats))

        each_row(errors.status, row, ms=ms, errors=errors, stage=STAGE, what="bank features failed")
        t = self.target
        for cat, rows in features.items():
            idx = [i for i, _ in rows]
            try:
                if cat not in t.digests:
                    raise KeyError(f"category {cat!r} is not one the driver asked for")
                written = write_part(category_dir(t.run_dir, cat, t.folder), [f for _, f in rows],
                                     [str(batch["image_id"][i]) for i in idx],
                                     {"category": cat, "digest": t.digests[cat], "precision": self.scorer.precision},
                                     self.scorer.storage, t.dtype)
            except Exception as exc:  # noqa: BLE001 - storage: the rows fail, named
                for i in idx:
                    errors.fail_with(i, STAGE, exc, "bank part could not be written")
                continue
            for i in idx:
                part[i], size[i], sha[i] = written["name"], written["bytes"], written["sha256"]
        precision = object_column([self.scorer.precision if errors.ok(i) else None for i in range(n)])
        for i in range(n):
            if not errors.ok(i):
                part[i] = sha[i] = None
                size[i] = 0
        out.update(bank_part=part, bank_part_bytes=size, bank_part_sha256=sha, bank_precision=precision, bank_ms=ms,
                   **errors.columns())
        return out
