"""One training step of APRIL-GAN's adapters on a frozen CLIP (METHODS.md section 3), pure torch.

The backbone runs without gradients; only the adapters learn. Per layer the map's probabilities
(B, 2, S, S) get focal (gamma 2) + binary dice loss against the masks, summed over the layers
(:func:`pipeline.models.adapters.adapter_loss`); Adam steps the adapters. ``zsad train``
(:mod:`pipeline.runtime.train`) runs this on Ray Train workers; tests run it directly.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models import adapters as adapter_models


def to_input(
    pixels: np.ndarray | list, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """uint8 images (B, S, S, 3) -> normalised float (B, 3, S, S) on ``device``."""
    x = torch.from_numpy(np.stack([np.asarray(p) for p in pixels])).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def text_matrix(normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """Two class vectors (E,) -> the (E, 2) text matrix [normal, anomalous] the maps use."""
    return torch.stack([normal, anomalous], dim=-1)


def train_step(
    visual: torch.nn.Module,
    adapters: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    masks: torch.Tensor,
    text: torch.Tensor,
    layers: tuple[int, ...],
) -> float:
    """One optimiser step on a batch: images (B, 3, S, S) normalised, masks (B, S, S) in {0, 1},
    text (B, E, 2) (each image's category's text matrix). Returns the batch loss."""
    with torch.no_grad():
        _, tokens = adapter_models.layer_features(visual, images, layers)
    size = (images.shape[-2], images.shape[-1])
    probs = adapter_models.layer_probabilities(adapters, [t.float() for t in tokens], text, size)
    loss = adapter_models.adapter_loss(probs, masks.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def make_optimizer(adapters: torch.nn.Module, learning_rate: float, betas: tuple[float, float]) -> torch.optim.Adam:
    return torch.optim.Adam(adapters.parameters(), lr=learning_rate, betas=tuple(betas))
