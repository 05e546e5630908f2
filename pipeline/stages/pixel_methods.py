"""The zero-shot pixel methods of the CLIP scorer, one per ``pixel.kind`` (METHODS.md section 3).

A method is registered by its kind (:func:`register`) and has two steps: ``check`` (settings that
cannot work with the scorer's model fail the stage at start-up, not every row; the driver checks
them first from the model's config: :mod:`pipeline.runtime.preflight`) and ``grids`` (the batch's
map grids, (B, h, w) or a list of maps already at their size, and the vision score per image or
None). :class:`pipeline.stages.clip_model.ClipScorer` looks its method up with :func:`pixel_method`;
a new pixel method is one class here (and its ``pixel`` spec section).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config import SpecError
from pipeline.ops.heatmap import map_shape
from pipeline.stages.base import LazyModule
from pipeline.stages.records import image_hw

torch = LazyModule("torch")
pixel_maps = LazyModule("pipeline.models.pixel")

#: pixel.kind -> its method
PIXEL_METHODS: dict[str, "PixelMethod"] = {}


def register(kind: str):
    """Class decorator: register an instance of the class as the method of ``pixel.kind == kind``."""

    def add(cls):
        PIXEL_METHODS[kind] = cls()
        return cls

    return add


def pixel_method(kind: str) -> "PixelMethod":
    try:
        return PIXEL_METHODS[kind]
    except KeyError:
        known = ", ".join(sorted(PIXEL_METHODS))
        raise SpecError(f"pixel.kind {kind!r} has no pixel method (known: {known})") from None


class PixelMethod:
    """No pixel map (``pixel.kind: none``): nothing to check, no grids."""

    #: the scorer's pass for the image score keeps these layers' tokens (APRIL-GAN's adapters)
    uses_tokens = False

    def check(self, scorer: Any) -> None:
        """Raise :class:`SpecError` for settings the scorer's model cannot run (after its set-up)."""

    def grids(self, scorer: Any, images, tensors, batch, score, groups, map_side=None) -> tuple[Any, Any]:
        """The batch's map grids and vision scores (None, None: no map)."""
        return None, None


register("none")(PixelMethod)


def _blocks(scorer: Any) -> int:
    return len(scorer.model.visual.transformer.resblocks)


@register("winclip_windows")
class WinclipWindowsMethod(PixelMethod):
    def check(self, scorer: Any) -> None:
        grid = scorer.preprocess.size // pixel_maps.vit.patch_size(scorer.model.visual)
        too_big = [k for k in scorer.pixel.window_sizes if k > grid]
        if too_big:
            raise SpecError(f"pixel.window_sizes {too_big} do not fit the {grid} x {grid} patch grid of "
                            f"{scorer.clip.model}")

    def grids(self, scorer: Any, images, tensors, batch, score, groups, map_side=None) -> tuple[Any, None]:
        """WinCLIP windows per category (their text differs), put back in batch order."""
        parts = {}
        for cat, idx in groups.items():
            img_scores = torch.from_numpy(score[idx]).to(scorer.device) if scorer.pixel.fuse_image_score else None
            parts[cat] = pixel_maps.winclip_map(
                scorer.model.visual, batch[idx], scorer.text_classifier(cat), scorer.score.temperature, img_scores,
                scorer.pixel.window_sizes,
            )
        first = next(iter(parts.values()))
        grids = torch.empty((len(images), *first.shape[1:]), device=first.device)
        for cat, idx in groups.items():
            grids[idx] = parts[cat]
        return grids, None


@register("fade_zero_shot")
class FadeZeroShotMethod(PixelMethod):
    def check(self, scorer: Any) -> None:
        blocks = _blocks(scorer)
        if scorer.pixel.gem_depth > blocks:
            raise SpecError(f"pixel.gem_depth={scorer.pixel.gem_depth} exceeds the {blocks} blocks of "
                            f"{scorer.clip.model}")

    def grids(self, scorer: Any, images, tensors, batch, score, groups, map_side=None) -> tuple[Any, np.ndarray]:
        """FADE's language + vision maps at every scale; also the vision score (the vision map's max)."""
        p = scorer.pixel
        _, vis, grids = pixel_maps.fade_maps(
            scorer.model.visual, scorer.fade_sizes(tensors), scorer.pixel_text_classifier(), p.temperature, p.grid,
            p.gem_depth, p.vision_multiplier, p.vision_weight, p.vision_features,
        )
        return grids, vis.amax(dim=(1, 2)).double().cpu().numpy()


@register("april_gan")
class AprilGanMethod(PixelMethod):
    uses_tokens = True

    def check(self, scorer: Any) -> None:
        blocks = _blocks(scorer)
        if scorer.pixel.layers[-1] > blocks:
            raise SpecError(f"pixel.layers {list(scorer.pixel.layers)} exceed the {blocks} blocks of "
                            f"{scorer.clip.model}")

    def grids(self, scorer: Any, images, tensors, tokens, score, groups, map_side=None) -> tuple[list, None]:
        """APRIL-GAN's summed adapter maps, made directly at each image's stored map size: the
        logits are upsampled before the softmax, so a map is not a resize of another size's map."""
        from pipeline.models.adapters import adapter_map

        maps: list = [None] * len(images)
        for cat, idx in groups.items():
            t = scorer.text_classifier(cat)
            text = torch.stack([t.normal, t.anomalous], dim=-1).to(scorer.device)  # (E, 2) unit columns
            for i in idx.tolist():
                img = images[i]
                shape = ((map_side, map_side) if map_side
                         else map_shape(*image_hw(img), scorer.maps.map_size))
                maps[i] = adapter_map(scorer.adapters, [tok[i : i + 1].float() for tok in tokens], text, shape)
        return maps, None


@register("clipseg")
class ClipSegMethod(PixelMethod):
    def grids(self, scorer: Any, images, tensors, batch, score, groups, map_side=None) -> tuple[Any, None]:
        from pipeline.models.clipseg import preprocess as clipseg_preprocess

        localiser = scorer.localiser
        return localiser.maps_torch(clipseg_preprocess(images, localiser.image_size, scorer.device)), None
