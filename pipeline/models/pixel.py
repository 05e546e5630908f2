"""Zero-shot pixel maps (METHODS.md section 3), pure torch.

- :func:`winclip_map`: WinCLIP windows of k patches (stride 1), window scores aggregated per patch by
  harmonic mean, scales and the image score fused harmonically.
- :func:`fade_maps`: FADE's GEM language maps at several input sizes averaged on a common grid, the
  zero-shot vision map (2nd nearest neighbour among the image's own patches, GEM or plain CLIP
  features), and their fusion.
- :func:`upsample`: bilinear upsampling of (B, g, g) maps to an output size.

All maps are anomaly probabilities in [0, 1] (the fixed output range used to store them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models import vit
from pipeline.models.scoring import TextClassifier, anomaly_probability
from pipeline.ops.heatmap import PROBABILITY_RANGE

MAP_RANGE = PROBABILITY_RANGE


def winclip_map(
    visual: torch.nn.Module,
    images: torch.Tensor,
    text: TextClassifier,
    temperature: float,
    image_scores: torch.Tensor | None,
    window_sizes: tuple[int, ...] = (2, 3),
    windows: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, 3, S, S) -> fused WinCLIP map (B, G, G).

    M = (K' / (sum_k 1 / M_k + [1 / s_img])) with K' the number of fused terms: the K window scales
    plus the image score when ``image_scores`` is given (METHODS.md: M = (S+1) / (1/s_img + sum 1/M_k)).
    ``windows``: the window embeddings {k: (B, W_k, E)} when the caller has them already (few-shot)."""
    tokens, grid = vit.embed(visual, images)
    b = images.shape[0]
    inv = torch.zeros(b, grid, grid, dtype=torch.float32, device=images.device)
    for k in window_sizes:
        emb = windows[k] if windows is not None else vit.window_embeddings(visual, tokens, grid, k)
        scores = anomaly_probability(emb.reshape(-1, emb.shape[-1]), text, temperature).reshape(b, -1)
        inv += 1.0 / vit.harmonic_patch_scores(scores, grid, k)
    terms = len(window_sizes)
    if image_scores is not None:
        inv += (1.0 / image_scores.float()).view(b, 1, 1)
        terms += 1
    return terms / inv


def second_neighbour_distance(patches: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Zero-shot vision score per patch: 0.5 * (1 - cos) to its 2nd nearest neighbour among the same
    image's patches (the 1st is the patch itself). (B, N, E) -> (B, N). Rows are processed in
    chunks so memory is O(chunk * N)."""
    pn = F.normalize(patches.float(), dim=-1)
    out = torch.empty(pn.shape[:2], device=pn.device)
    for b in range(pn.shape[0]):
        for i in range(0, pn.shape[1], chunk):
            sims = pn[b, i : i + chunk] @ pn[b].T
            out[b, i : i + chunk] = 0.5 * (1.0 - sims.topk(2, dim=-1).values[:, 1])
    return out


def _to_grid(values: torch.Tensor, grid: int, out: int) -> torch.Tensor:
    maps = values.reshape(-1, 1, grid, grid)
    if grid != out:
        maps = F.interpolate(maps, size=(out, out), mode="bilinear", align_corners=False)
    return maps[:, 0]


def fade_maps(
    visual: torch.nn.Module,
    images_by_size: dict[int, torch.Tensor],
    text: TextClassifier,
    temperature: float = 0.01,
    grid: int = 56,
    depth: int = 6,
    vision_multiplier: float = 80.0,
    vision_weight: float = 0.5,
    vision_features: str = "gem",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FADE zero-shot maps from the same images prepared at several sizes ({size: (B, 3, size, size)}).

    Returns (language, vision, fused), each (B, grid, grid): language = mean over sizes of
    softmax(sims / tau)[anomalous] of the GEM patch embeddings; vision = multiplier x mean over sizes
    of the 2nd-neighbour distance of the ``vision_features`` patch embeddings (``gem``: the GEM
    stream's, FADE's published zero-shot setting; ``clip``: the plain final tokens); fused =
    clip((1 - w) L + w V)."""
    if vision_features not in ("gem", "clip"):
        raise ValueError(f"unknown vision_features {vision_features!r} (gem, clip)")
    language, patches = fade_language(visual, images_by_size, text, temperature, grid, depth)
    vis = []
    for size, (gem_patches, plain_patches, g) in patches.items():
        features = gem_patches if vision_features == "gem" else plain_patches
        vis.append(_to_grid(second_neighbour_distance(features), g, grid))
    vision = torch.stack(vis).mean(0) * vision_multiplier
    return language, vision, fade_fuse(language, vision, vision_weight)


def fade_fuse(language: torch.Tensor, vision: torch.Tensor, vision_weight: float) -> torch.Tensor:
    """FADE's fused map: clip((1 - w) * language + w * vision) to [0, 1]."""
    return ((1.0 - vision_weight) * language + vision_weight * vision).clamp(*MAP_RANGE)


def fade_language(
    visual: torch.nn.Module,
    images_by_size: dict[int, torch.Tensor],
    text: TextClassifier,
    temperature: float = 0.01,
    grid: int = 56,
    depth: int = 6,
) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor, int]]]:
    """FADE's language map (B, grid, grid), the mean over sizes of softmax(sims / tau)[anomalous]
    of the GEM patch embeddings, and per size (GEM patches, plain patches, patch grid) for the
    vision maps (zero-shot or few-shot)."""
    lang, patches = [], {}
    for size in sorted(images_by_size):
        images = images_by_size[size]
        b = images.shape[0]
        _, gem_patches, plain_patches, g = vit.gem_forward(visual, images, depth)
        l_map = anomaly_probability(gem_patches.reshape(-1, gem_patches.shape[-1]), text, temperature)
        lang.append(_to_grid(l_map.reshape(b, -1), g, grid))
        patches[size] = (gem_patches, plain_patches, g)
    return torch.stack(lang).mean(0), patches


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, g, g) -> (B, H, W) bilinear (align_corners=False); maps stay within their range."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
