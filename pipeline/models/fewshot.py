"""Few-shot vision maps from per-category memory banks (METHODS.md section 4), pure torch.

A *bank* is a dict {feature key: (M, D) tensor}: the features of the k reference images of one
category, all positions of all images stacked (no positional correspondence). The same feature
functions make the bank from the references and the queries from the image being scored, so both
sides always come from identical model code. Every search is the exact nearest neighbour of
:func:`pipeline.models.memory_bank.nearest_cosine_distance` (chunked, on the inputs' device).

Per method, as its reference code computes it:

- **WinCLIP+** (anomalib's ``WinClipModel`` with ``k_shot > 0``): keys ``patch`` (the final patch
  tokens after ln_post, NOT projected, as open_clip's ``tokens`` output) and ``window<k>`` (the
  window embeddings of the zero-shot map, ln_post(CLS) @ proj). Score of a query feature:
  ``min over the bank of (1 - cos) / 2``. Few-shot map = arithmetic mean of the patch map and, per
  window size, the window scores aggregated per patch by the harmonic mean of the windows covering
  it (a window at distance 0 makes its patches 0). Map = (zero-shot + few-shot) / 2 on the patch
  grid; image score = (zero-shot image score + max of the few-shot grid) / 2.
- **APRIL-GAN** (``test.py`` few-shot mode): keys ``layer<l>``, the raw residual-stream outputs of
  the adapters' blocks (class token dropped, no ln_post, no adapter). Per layer the map is
  ``min over the bank of 1 - cos``, upsampled bilinearly with ``align_corners=True``; the layers
  are SUMMED and the sum is added to the zero-shot adapter map.
- **FADE** (``run_fade.py`` with ``--shots k``): keys ``scale<s>``, the patch tokens at each input
  size (the plain stream after ln_post and proj, or the GEM stream's). Per scale
  ``0.5 * (1 - cos)`` to the nearest bank feature of the same scale, resized to the common grid
  (bilinear, half-pixel centres, like cv2's INTER_LINEAR), averaged over scales, times the
  multiplier (3.5).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from pipeline.models import vit
from pipeline.models.memory_bank import nearest_cosine_distance
from pipeline.models.precision import forward_pass

Bank = Mapping[str, torch.Tensor]


def _search(queries: torch.Tensor, bank: torch.Tensor, chunks: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) queries -> (B, N) smallest 1 - cos to the (M, D) bank."""
    b, n, d = queries.shape
    dist = nearest_cosine_distance(queries.reshape(b * n, d), bank.to(queries.device), query_chunk=chunks[0],
                                   bank_chunk=chunks[1])
    return dist.reshape(b, n)


def _key(bank: Bank, key: str) -> torch.Tensor:
    if key not in bank:
        raise ValueError(f"the memory bank has no {key!r} features (it has {', '.join(sorted(bank)) or 'none'}): "
                         "it was built for another method or configuration")
    return bank[key]


# --------------------------------------------------------------------------------------------
# WinCLIP+
# --------------------------------------------------------------------------------------------


@forward_pass
def winclip_features(
    visual: torch.nn.Module, images: torch.Tensor, window_sizes: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """(B, 3, S, S) -> {``patch``: (B, G*G, width) final patch tokens after ln_post (not projected),
    ``window<k>``: (B, W_k, E) window embeddings} for every window size."""
    tokens, grid = vit.embed(visual, images)
    x = tokens
    for block in visual.transformer.resblocks:
        x = vit.block_forward(block, x)
    out = {"patch": visual.ln_post(x[:, 1:])}
    for k in window_sizes:
        out[f"window{k}"] = vit.window_embeddings(visual, tokens, grid, k)
    return out


def harmonic_patch_scores_safe(window_scores: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """:func:`pipeline.models.vit.harmonic_patch_scores` where a score may be 0: a patch covered by
    a window of score 0 is 0 (count / infinity), as anomalib's ``harmonic_aggregation``."""
    cover = vit.window_coverage(grid, k).to(window_scores)
    zero = window_scores <= 0
    inv = (1.0 / torch.where(zero, torch.ones_like(window_scores), window_scores)) @ cover
    out = cover.sum(0) / inv
    out = torch.where((zero.to(cover.dtype) @ cover) > 0, torch.zeros_like(out), out)
    return out.reshape(-1, grid, grid)


def winclip_fewshot_map(
    queries: Mapping[str, torch.Tensor],
    bank: Bank,
    grid: int,
    window_sizes: tuple[int, ...],
    chunks: tuple[int, int] = (4096, 16384),
) -> torch.Tensor:
    """WinCLIP+'s few-shot map (B, G, G): mean of the patch association map and the harmonically
    aggregated window association maps; association = min over the bank of (1 - cos) / 2."""
    patch = queries["patch"]
    b = patch.shape[0]
    maps = [(_search(patch, _key(bank, "patch"), chunks) / 2).reshape(b, grid, grid)]
    for k in window_sizes:
        scores = _search(queries[f"window{k}"], _key(bank, f"window{k}"), chunks) / 2
        maps.append(harmonic_patch_scores_safe(scores, grid, k))
    return torch.stack(maps).mean(0)


# --------------------------------------------------------------------------------------------
# APRIL-GAN
# --------------------------------------------------------------------------------------------


def aprilgan_features(tokens: list[torch.Tensor], layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The layers' raw tokens (class token dropped, as :func:`pipeline.models.vit.forward_with_layers`
    returns them) as bank features {``layer<l>``: (B, N, D)}."""
    if len(tokens) != len(layers):
        raise ValueError(f"{len(tokens)} token tensors for {len(layers)} layers")
    return {f"layer{l}": t for l, t in zip(layers, tokens)}


def aprilgan_distances(
    queries: Mapping[str, torch.Tensor], bank: Bank, layers: tuple[int, ...], chunks: tuple[int, int] = (4096, 16384)
) -> list[torch.Tensor]:
    """Per layer, min over the bank of 1 - cos of each query token, on its grid: [(B, 1, G, G)]."""
    out = []
    for l in layers:
        q = queries[f"layer{l}"]
        b, n, _ = q.shape
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"layer {l} has {n} tokens, not a square grid")
        out.append(_search(q, _key(bank, f"layer{l}"), chunks).reshape(b, 1, g, g))
    return out


def aprilgan_upsample_sum(distances: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The layers' distance grids upsampled bilinearly (align_corners=True) to ``size`` and summed: (B, H, W)."""
    return sum(F.interpolate(d, size=size, mode="bilinear", align_corners=True)[:, 0] for d in distances)


# --------------------------------------------------------------------------------------------
# FADE
# --------------------------------------------------------------------------------------------


def fade_features(
    visual: torch.nn.Module, images_by_size: Mapping[int, torch.Tensor], features: str = "clip", depth: int = 6
) -> dict[str, torch.Tensor]:
    """{``scale<s>``: (B, N_s, E)} patch tokens at every input size: the plain stream after ln_post
    and proj (``clip``) or the GEM stream's (``gem``, GEM on the last ``depth`` blocks)."""
    if features not in ("clip", "gem"):
        raise ValueError(f"unknown vision features {features!r} (clip, gem)")
    out = {}
    for size in sorted(images_by_size):
        if features == "clip":
            _, patches, _ = vit.clip_forward(visual, images_by_size[size])
        else:
            _, patches, _, _ = vit.gem_forward(visual, images_by_size[size], depth)
        out[f"scale{size}"] = patches
    return out


def fade_fewshot_vision(
    queries: Mapping[str, torch.Tensor],
    bank: Bank,
    grid: int = 56,
    multiplier: float = 3.5,
    chunks: tuple[int, int] = (4096, 16384),
) -> torch.Tensor:
    """FADE's few-shot vision map (B, grid, grid): per scale 0.5 * (1 - cos) to the nearest bank
    feature of that scale, resized to ``grid`` (bilinear, align_corners=False), mean over the
    scales, times ``multiplier``."""
    maps = []
    for key in sorted(queries, key=lambda k: int(k[len("scale") :])):
        q = queries[key]
        b, n, _ = q.shape
        g = int(round(n**0.5))
        dist = (0.5 * _search(q, _key(bank, key), chunks)).reshape(b, 1, g, g)
        if g != grid:
            dist = F.interpolate(dist, size=(grid, grid), mode="bilinear", align_corners=False)
        maps.append(dist[:, 0])
    return torch.stack(maps).mean(0) * multiplier
