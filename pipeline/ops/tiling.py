"""Tiling plan for multi-instance images (METHODS.md section 5, VVV): a pure function of the
foreground components and the image size; nothing is cropped here and no state is kept (the inverse,
putting tile maps back in image space, is ``pipeline.ops.aggregate``).

Conventions
-----------
- Boxes (component boxes and tile boxes) are ``(x0, y0, x1, y1)`` integers in original image
  pixels, ``x`` = column, ``y`` = row, ``x1``/``y1`` EXCLUSIVE; pixel ``(row, col)`` covers the
  continuous square ``[col, col + 1) x [row, row + 1)``, so the centre of box ``(x0, y0, x1, y1)`` is
  ``((x0 + x1) / 2, (y0 + y1) / 2)``, possibly a half-integer.
- ``image_hw = (H, W)``.

Rules
-----
- One square tile per component, centred on its box centre, of side
  ``max(min_tile, long side of the box)`` (smaller crops get distorted by model preprocessing).
- Elongated components: box aspect ratio (long / short side) > ``elongated_aspect`` AND more than
  ``elongated_min_parts`` SAM parts. Square tiles of side ``max(min_tile, short side)`` whose centres
  run along the box's long axis, on the short axis' box centre line, from one end of the box to the
  other: centres at ``start, start + step, start + 2 step, ...`` with ``step = short side / 2``, and a
  last one exactly at the far end when the steps do not land on it. Consecutive tiles overlap by at
  least half a tile, so every part of the component is near the centre of some tile. Tiles that
  end up identical after the shift below are emitted once.
- Clipping: a side larger than ``min(H, W)`` (image smaller than ``min_tile``, or a component longer
  than the image's short side) is clipped to ``min(H, W)``; the tile's ``reason`` then says so:
  ``"clipped"`` (single component tile) or ``"elongated_clipped"``. A clipped single tile may not
  cover the whole component.
- Placement: a tile's corner is ``floor(centre - side / 2)`` (exact integer arithmetic) and the tile
  is then SHIFTED (never shrunk) to lie inside the image, so tiles of components near the image edge
  are off-centre (the component centre still lies inside the tile).
- No components: one tile covering the whole image, ``(0, 0, W, H)`` (not square),
  ``component_id = -1``, reason ``"whole_image"``.
- Order: components in the given order; within a component, tiles from the start of the long axis
  (left or top) to its end.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Tile", "REASONS", "plan_tiles"]

#: Every ``Tile.reason``: a component tile, an elongated component's tile along its long axis, each
#: of them with its side clipped to the image's short side, and the no-component fallback.
REASONS: tuple[str, ...] = ("component", "clipped", "elongated", "elongated_clipped", "whole_image")


@dataclass(frozen=True)
class Tile:
    """A crop to score: ``box`` ``(x0, y0, x1, y1)`` image pixels (exclusive ends) for component
    ``component_id`` (-1 for the whole-image fallback); ``reason`` one of :data:`REASONS`."""

    component_id: int
    box: tuple[int, int, int, int]
    reason: str

    @property
    def clipped(self) -> bool:
        """True when the tile side was clipped to the image's short side."""
        return self.reason in ("clipped", "elongated_clipped")


def plan_tiles(
    components: Sequence[Any],
    image_hw: tuple[int, int],
    *,
    min_tile: int = 352,
    elongated_aspect: float = 1.5,
    elongated_min_parts: int = 20,
) -> list[Tile]:
    """The tiles of an image of size ``image_hw = (H, W)`` holding ``components``.

    ``components``: objects with ``id`` (int), ``box`` ``(x0, y0, x1, y1)`` (non-empty, inside the
    image) and ``n_parts`` (int), e.g. ``pipeline.ops.foreground.Component``. ``min_tile`` >= 1 px:
    smallest tile side; ``elongated_aspect`` >= 1 and ``elongated_min_parts`` >= 0: the elongated
    rule's thresholds (both strict). Rules in the module docstring. Returns at least one tile.
    """
    h, w = _check_hw(image_hw)
    try:
        min_tile = _positive_int(min_tile)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"min_tile must be a positive integer (pixels), got {min_tile!r}") from exc
    try:
        aspect_limit = float(elongated_aspect)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"elongated_aspect must be a number >= 1, got {elongated_aspect!r}") from exc
    if not aspect_limit >= 1.0:  # also rejects NaN
        raise ValueError(f"elongated_aspect must be a number >= 1, got {elongated_aspect!r}")
    try:
        min_parts = _int_at_least(elongated_min_parts, 0)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"elongated_min_parts must be a non-negative integer, got {elongated_min_parts!r}") from exc

    if len(components) == 0:
        return [Tile(component_id=-1, box=(0, 0, w, h), reason="whole_image")]

    limit = min(h, w)
    tiles: list[Tile] = []
    for index, comp in enumerate(components):
        cid, (x0, y0, x1, y1), n_parts = _check_component(index, comp, h, w)
        bw, bh = x1 - x0, y1 - y0
        long_side, short_side = max(bw, bh), min(bw, bh)
        if long_side > aspect_limit * short_side and n_parts > min_parts:
            side = max(min_tile, short_side)
            reason = "elongated"
            if side > limit:
                side, reason = limit, "elongated_clipped"
            # Work in half-pixel units (twice the coordinates) so centres are exact integers.
            if bw >= bh:
                centres2 = [(c2, y0 + y1) for c2 in _centres2(2 * x0, 2 * x1, short_side)]
            else:
                centres2 = [(x0 + x1, c2) for c2 in _centres2(2 * y0, 2 * y1, short_side)]
        else:
            side = max(min_tile, long_side)
            reason = "component"
            if side > limit:
                side, reason = limit, "clipped"
            centres2 = [(x0 + x1, y0 + y1)]
        seen: set[tuple[int, int, int, int]] = set()
        for cx2, cy2 in centres2:
            box = _place(cx2, cy2, side, h, w)
            if box not in seen:
                seen.add(box)
                tiles.append(Tile(component_id=cid, box=box, reason=reason))
    return tiles


def _centres2(start2: int, end2: int, step2: int) -> list[int]:
    """Doubled centres from ``start2`` to ``end2`` (both doubled coordinates) every ``step2`` (the
    doubled half short side = the short side), the last one exactly at ``end2``."""
    centres = list(range(start2, end2, step2))
    if centres[-1] != end2:
        centres.append(end2)
    return centres


def _place(cx2: int, cy2: int, side: int, h: int, w: int) -> tuple[int, int, int, int]:
    """Square box of ``side`` centred at doubled centre ``(cx2, cy2)``, shifted inside ``(h, w)``."""
    x0 = (cx2 - side) // 2  # floor(cx - side / 2)
    y0 = (cy2 - side) // 2
    x0 = min(max(x0, 0), w - side)
    y0 = min(max(y0, 0), h - side)
    return (x0, y0, x0 + side, y0 + side)


def _check_hw(image_hw: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (_positive_int(v) for v in image_hw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"image_hw must be (H, W), two positive integers, got {image_hw!r}") from exc
    return h, w


def _positive_int(value: Any) -> int:
    return _int_at_least(value, 1)


def _int_at_least(value: Any, low: int) -> int:
    if isinstance(value, bool):
        raise TypeError("bool is not a count")
    v = operator.index(value)  # int or numpy integer; floats raise TypeError
    if v < low:
        raise ValueError(f"below {low}")
    return int(v)


def _check_component(index: int, comp: Any, h: int, w: int) -> tuple[int, tuple[int, int, int, int], int]:
    try:
        cid, box, n_parts = int(comp.id), tuple(int(v) for v in comp.box), int(comp.n_parts)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"components[{index}] needs integer id, box (x0, y0, x1, y1) and n_parts, got {comp!r}"
        ) from exc
    if len(box) != 4:
        raise ValueError(f"components[{index}].box must be (x0, y0, x1, y1), got {comp.box!r}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(
            f"components[{index}].box {box} must be non-empty and inside the image (W={w}, H={h}; x1/y1 exclusive)"
        )
    if n_parts < 0:
        raise ValueError(f"components[{index}].n_parts must be >= 0, got {n_parts}")
    return cid, (x0, y0, x1, y1), n_parts
