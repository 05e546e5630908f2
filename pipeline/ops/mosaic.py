"""Mosaic augmentation for adapter training (APRIL-GAN's idea: with some probability a training image
becomes a 2 x 2 grid of four images of its category, with their masks), pure torch.

APRIL-GAN draws the four from the category's whole training set and pastes them at full size before
resizing; here they are drawn, with replacement, from the rows of the same category in the current
batch (the data is shuffled, and a worker never holds the whole set), already at the training size:
the 2S x 2S grid is shrunk back to S x S (image: bilinear with antialias; mask: the same, then
thresholded at 0.5, as the reference thresholds its resized masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mosaic(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Four images (4, C, S, S) and masks (4, S, S) -> one image (C, S, S) and mask (S, S): the
    first top-left, the second top-right, the third bottom-left, the fourth bottom-right."""
    if images.shape[0] != 4 or masks.shape[0] != 4:
        raise ValueError(f"a mosaic needs 4 images and 4 masks, got {images.shape[0]} and {masks.shape[0]}")
    c, s = images.shape[1], images.shape[-1]
    top = torch.cat([images[0], images[1]], dim=-1)
    bottom = torch.cat([images[2], images[3]], dim=-1)
    grid = torch.cat([top, bottom], dim=-2)  # (C, 2S, 2S)
    mtop = torch.cat([masks[0], masks[1]], dim=-1)
    mbottom = torch.cat([masks[2], masks[3]], dim=-1)
    mgrid = torch.cat([mtop, mbottom], dim=-2).float()
    image = F.interpolate(grid[None].float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
    mask = F.interpolate(mgrid[None, None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return image.to(images.dtype).reshape(c, s, s), (mask > 0.5).to(masks.dtype)


def apply_mosaics(
    images: torch.Tensor, masks: torch.Tensor, categories: list[str], probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Replace each row, with ``probability``, by a mosaic of four rows of its category drawn with
    replacement from this batch (``generator`` makes it reproducible). Returns (images, masks, the
    number of mosaics made); the inputs are not modified."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mosaic probability {probability} is not in [0, 1]")
    if len(categories) != images.shape[0]:
        raise ValueError(f"{len(categories)} categories for {images.shape[0]} images")
    out_images, out_masks = images.clone(), masks.clone()
    made = 0
    by_category: dict[str, list[int]] = {}
    for i, cat in enumerate(categories):
        by_category.setdefault(cat, []).append(i)
    draws = torch.rand(len(categories), generator=generator)
    for i, cat in enumerate(categories):
        if float(draws[i]) >= probability:
            continue
        pool = by_category[cat]
        picks = [pool[int(k)] for k in torch.randint(len(pool), (4,), generator=generator)]
        out_images[i], out_masks[i] = mosaic(images[picks], masks[picks])
        made += 1
    return out_images, out_masks, made
