"""CLIP scoring stage: WinCLIP zero-shot image-level score (METHODS.md sections 1-2).

Runs as a model actor pool: :meth:`ClipScoreStage.setup` builds the model once per actor; text
classifiers are computed once per category per actor and cached; images of a batch are encoded in
one forward pass. Rows that failed earlier pass through untouched; a failure while scoring turns
the affected rows into ``status = error`` rows with ``error_stage = clip_score``.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from pipeline.config import ClipSpec, WinclipImageScore
from pipeline.io.fs import StorageOptions
from pipeline.io.weights import resolve
from pipeline.models import clip as clip_models
from pipeline.models.prompts import PROMPT_SETS, object_name
from pipeline.models.scoring import TextClassifier, anomaly_probability, build_classifier
from pipeline.stages._columns import check_columns

STAGE = "clip_score"
ModelFactory = Callable[[], tuple[torch.nn.Module, clip_models.Preprocess]]


def pick_device(use_gpu: bool) -> torch.device:
    """The stage's device: CUDA when the stage was given a GPU and this worker has one."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


class ClipScoreStage:
    """Batch callable: adds ``score`` (float64, NaN when not scored) and ``clip_score_ms``.

    ``model_factory`` (optional) returns (model, preprocess) and replaces weight resolution, for
    tests that build their own model.
    """

    name = STAGE
    requires = ("image", "category", "status", "error_stage", "error_type", "error_message")
    produces = ("score", "clip_score_ms")

    def __init__(
        self,
        clip: ClipSpec,
        score: WinclipImageScore,
        *,
        weights_cache: str | None = None,
        storage: StorageOptions | None = None,
        use_gpu: bool = False,
        model_factory: ModelFactory | None = None,
    ) -> None:
        self.clip = clip
        self.score = score
        self.weights_cache = weights_cache
        self.storage = storage
        self.use_gpu = use_gpu
        self.model_factory = model_factory
        self.model: torch.nn.Module | None = None
        self.preprocess: clip_models.Preprocess | None = None
        self.device = torch.device("cpu")
        self._tokenizer = None
        self._text: dict[str, TextClassifier] = {}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        if self.model is not None:
            return
        self.device = pick_device(self.use_gpu)
        if self.model_factory is not None:
            model, pre = self.model_factory()
            model = model.to(self.device).eval()
        else:
            weights = resolve(self.clip.weights, self.weights_cache, self.storage)
            model, pre = clip_models.build_clip(
                self.clip.model,
                tag=weights.tag,
                checkpoint=weights.path,
                cache_dir=self.weights_cache,
                image_size=self.clip.image_size,
                precision=self.clip.precision if self.device.type == "cuda" else "fp32",
                device=self.device,
            )
        self.model, self.preprocess = model, pre
        import open_clip

        self._tokenizer = open_clip.get_tokenizer(self.clip.model)

    @torch.inference_mode()
    def text_classifier(self, category: str) -> TextClassifier:
        """The (normal, anomalous) text classifier of ``category``, computed once and cached."""
        cached = self._text.get(category)
        if cached is None:
            name = object_name(category, self.score.object_names.policy, self.score.object_names.overrides)
            normal, anomalous = PROMPT_SETS[self.score.prompt_set].sentences(name)
            raw = clip_models.encode_text(self.model, self._tokenizer, normal + anomalous, self.device)
            cached = build_classifier(raw[: len(normal)], raw[len(normal) :], self.score.aggregation)
            self._text[category] = cached
        return cached

    @torch.inference_mode()
    def score_images(self, images: list[np.ndarray], categories: list[str]) -> np.ndarray:
        """Score uint8 (H, W, 3) images in one forward pass; returns float64 (B,)."""
        tensors = [torch.from_numpy(img if img.flags.writeable and img.flags.c_contiguous else np.array(img)) for img in images]
        batch = clip_models.preprocess_images(tensors, self.preprocess).to(self.device)
        feats = clip_models.encode_image(self.model, batch)
        out = np.empty(len(images), dtype=np.float64)
        cats = np.asarray(categories, dtype=object)
        for cat in dict.fromkeys(categories):
            idx = np.flatnonzero(cats == cat)
            probs = anomaly_probability(feats[idx], self.text_classifier(cat), self.score.temperature)
            out[idx] = probs.double().cpu().numpy()
        return out

    # ---------------------------------------------------------------- call
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = check_columns(STAGE, batch, self.requires)
        self.setup()
        out = dict(batch)
        status = np.array(batch["status"], dtype=object)
        err_stage = np.array(batch["error_stage"], dtype=object)
        err_type = np.array(batch["error_type"], dtype=object)
        err_msg = np.array(batch["error_message"], dtype=object)
        scores = np.full(n, np.nan)
        ms = np.full(n, np.nan)
        todo = [i for i in range(n) if status[i] == "ok"]
        images = batch["image"]
        cats = [str(c) for c in batch["category"]]

        def fail(i: int, exc: BaseException) -> None:
            status[i], err_stage[i] = "error", STAGE
            err_type[i] = type(exc).__name__
            err_msg[i] = f"scoring failed: {exc}"

        if todo:
            t0 = time.perf_counter()
            try:
                scores[todo] = self.score_images([images[i] for i in todo], [cats[i] for i in todo])
                ms[todo] = (time.perf_counter() - t0) * 1000.0 / len(todo)
            except Exception:  # one bad row must not sink the batch: retry one by one
                for i in todo:
                    t1 = time.perf_counter()
                    try:
                        scores[i] = self.score_images([images[i]], [cats[i]])[0]
                        ms[i] = (time.perf_counter() - t1) * 1000.0
                    except Exception as exc:
                        fail(i, exc)
            for i in todo:
                if status[i] == "ok" and not np.isfinite(scores[i]):
                    fail(i, FloatingPointError(f"non-finite score {scores[i]}"))
                    scores[i] = np.nan
        out.update(score=scores, clip_score_ms=ms, status=status, error_stage=err_stage, error_type=err_type, error_message=err_msg)
        return out
