"""Language-guided image-level scores (METHODS.md section 2), pure torch.

Text side: the raw embeddings of the normal and anomalous sentences are turned into a
:class:`TextClassifier` by one of the aggregation rules below. Image side:
``s = softmax([sim(f, t_n), sim(f, t_a)] / tau)[anomalous]`` with f the normalised image embedding.

Aggregations (they change calibration, not only the ranking):
- ``mean_raw`` (anomalib WinCLIP): mean of raw embeddings; cosine against it (normalise inside).
- ``mean_norm`` (FADE): normalise each, mean, no renormalisation: sim = f . t (shorter t, lower logits).
- ``mean_norm_renorm`` (APRIL-GAN, CLIP zero-shot classifiers): normalise each, mean, renormalise.
- ``per_prompt`` (VVV): sim = mean over the prompts of cos(f, t_i), for each class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

AGGREGATIONS = ("mean_raw", "mean_norm", "mean_norm_renorm", "per_prompt")


@dataclass(frozen=True)
class TextClassifier:
    """Per-class text vectors. ``normal``/``anomalous`` are (D,) for the mean rules and (N, D)
    (each row unit length) for ``per_prompt``."""

    aggregation: str
    normal: torch.Tensor
    anomalous: torch.Tensor


def _aggregate(raw: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "mean_raw":
        return F.normalize(raw.mean(0), dim=-1)
    if aggregation == "mean_norm":
        return F.normalize(raw, dim=-1).mean(0)
    if aggregation == "mean_norm_renorm":
        return F.normalize(F.normalize(raw, dim=-1).mean(0), dim=-1)
    if aggregation == "per_prompt":
        return F.normalize(raw, dim=-1)
    raise ValueError(f"unknown text aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def build_classifier(normal_raw: torch.Tensor, anomalous_raw: torch.Tensor, aggregation: str) -> TextClassifier:
    """Raw text embeddings (N_n, D) and (N_a, D) -> a :class:`TextClassifier`."""
    return TextClassifier(
        aggregation, _aggregate(normal_raw.float(), aggregation), _aggregate(anomalous_raw.float(), aggregation)
    )


def class_similarities(image_raw: torch.Tensor, text: TextClassifier) -> torch.Tensor:
    """Raw image embeddings (B, D) -> similarities (B, 2) to [normal, anomalous]."""
    f = F.normalize(image_raw.float(), dim=-1)
    if text.aggregation == "per_prompt":
        return torch.stack([(f @ text.normal.T).mean(-1), (f @ text.anomalous.T).mean(-1)], dim=-1)
    return torch.stack([f @ text.normal, f @ text.anomalous], dim=-1)


def anomaly_probability(image_raw: torch.Tensor, text: TextClassifier, temperature: float) -> torch.Tensor:
    """(B, D) raw image embeddings -> (B,) probability of the anomalous class."""
    sims = class_similarities(image_raw, text)
    return torch.softmax(sims / temperature, dim=-1)[:, 1]
