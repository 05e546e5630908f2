"""Tiny CLIP checkpoints written in code, and the scores a clip_score stage gives with them."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.config import ClipSpec, ZeroShotImageScore
from pipeline.io import fs as fsio
from pipeline.models import clip as clip_models
from pipeline.stages.clip_score import ClipScoreStage
from tests.helpers.batches import image_batch


def random_clip_checkpoint(path) -> str:
    """Save a random ``zsad-tiny`` state dict (the seeded random init plus seeded noise, so it differs
    from the init) to ``path`` (a ``pathlib.Path``) and return its sha256 hex digest."""
    model, _ = clip_models.build_clip("zsad-tiny")
    g = torch.Generator().manual_seed(42)
    sd = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    torch.save(sd, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_clip_scores(weights, cache) -> np.ndarray:
    """The (2,) float64 image scores of a ``zsad-tiny`` clip_score stage loading ``weights`` (a weights
    spec or None for the random init; through ``cache`` and the environment's storage options) on two
    seeded random 64 x 64 images of category ``"widget"``."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    stage = ClipScoreStage(
        ClipSpec(model="zsad-tiny", weights=weights),
        ZeroShotImageScore(),
        weights_cache=str(cache),
        storage=fsio.storage_options(),
    )
    return stage(image_batch(images, "widget"))["score"]
