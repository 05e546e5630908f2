"""Foreground extraction for multi-instance images (METHODS.md section 5, VVV), pure numpy + scipy.

- :func:`classical_foreground`: a classical dichotomous (foreground/background) probability map,
  used where no learned dichotomous segmentation model is configured.
- :func:`filter_masks`: which SAM automatic masks to keep: those lying mostly (>= 80%) inside the
  dichotomous foreground (VVV; this beats the dichotomous mask alone, which tends to take shadows).
- :func:`union`: the kept masks merged into one foreground mask.
- :func:`components`: connected components of a foreground mask, with boxes, areas and the number
  of SAM parts assigned to each (the tiling plan, ``pipeline.ops.tiling``, uses the part counts).
- :func:`components_at`: those of an image decoded at a working size, brought to its original size.

Conventions
-----------
- Images are ``(H, W, 3)`` uint8 RGB arrays indexed ``image[row, col]``; maps and masks are
  ``(H, W)`` (float32 probabilities in [0, 1], bool masks).
- Boxes are ``(x0, y0, x1, y1)`` integers in image pixels, ``x`` = column, ``y`` = row, with
  ``x1``/``y1`` EXCLUSIVE: the box covers ``image[y0:y1, x0:x1]``.

The classical foreground method
-------------------------------
The image border is taken as a sample of the background: the "boundary / background prior" of
salient-object detection (e.g. Wei et al., *Geodesic saliency using background priors*, ECCV 2012;
Yang et al., *Saliency detection via graph-based manifold ranking*, CVPR 2013), which is also the
idea behind chroma keying against a known backdrop. Inspection images usually show the objects on a
plain, possibly unevenly lit, support, so the background is modelled per channel as a plane in the
pixel coordinates (a constant colour plus a linear illumination gradient) fitted robustly:

1. Each channel is median-filtered over a ``smooth`` x ``smooth`` window to tame sensor noise (a
   median, unlike a Gaussian, does not smear object edges outwards, so objects do not grow).
2. Background samples: the pixels of a band of width ``max(1, round(border * min(H, W)))`` px along
   the four image edges (subsampled to at most 20000 pixels with a fixed stride: deterministic).
3. Robust fit, per channel ``c``: start from the median colour, then ``iterations`` times: scale
   ``s_c = 1.4826 * MAD`` of the residuals (the median absolute deviation, a consistent estimate of
   a Gaussian sigma that tolerates up to 50% outliers), inliers = samples whose residual is within
   ``3 s_c`` in every channel, and a least-squares plane ``a_c + b_c x + d_c y`` on the inliers
   (``gradient=False`` keeps a constant colour: the inliers' median). Objects that touch the
   border therefore do not drag the model as long as they cover less than about half of the band.
   The final scale is floored at ``min_scale`` intensity levels (a perfectly flat synthetic
   background would otherwise have scale 0).
4. Normalised distance of every pixel to the model: the RMS over channels of ``r_c / s_c`` (so a
   background pixel has distance about 1 whatever its colour; objects darker, brighter or of
   another hue than the background all get large distances).
5. Probability ``p = 1 / (1 + exp(-(d - threshold) / softness))``: 0.5 at ``threshold`` sigmas.
6. Morphology on ``p >= 0.5`` (scipy.ndimage, disc structuring elements): binary opening of radius
   ``open_radius`` (removes thin noise), closing of radius ``close_radius`` (bridges small gaps),
   hole filling (a defect or a background-coloured detail inside an object stays foreground), then
   connected components (8-connectivity) smaller than ``min_area * H * W`` pixels are removed.
7. The returned map is ``p``, made consistent with the cleaned mask: pixels the cleaning added
   (closing, hole filling) are raised to exactly 0.5, pixels it removed (specks, opened-away
   protrusions) are set to 0. Hence ``classical_foreground(...) >= 0.5`` IS the cleaned mask.

Limits: a background of several distinct colours (e.g. a two-tone fixture) or a textured one is not
modelled (its second colour becomes foreground); shadows are foreground (hence the SAM filtering);
an object covering most of the border band makes the border a poor background sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.ops import heatmap

__all__ = ["Component", "classical_foreground", "filter_masks", "union", "components", "components_at"]

_MAD_TO_SIGMA = 1.4826
_MAX_BORDER_SAMPLES = 20000


@dataclass
class Component:
    """One connected foreground component.

    ``id``: 0..n-1, in the order of ``(y0, x0)`` of the box (ties: ``y1``, ``x1``, then scan order);
    ``box``: ``(x0, y0, x1, y1)`` image pixels, ``x1``/``y1`` exclusive; ``area``: pixel count;
    ``n_parts``: the number of part masks whose largest overlap is with this component."""

    id: int
    box: tuple[int, int, int, int]
    area: int
    n_parts: int


def classical_foreground(
    image: np.ndarray,
    *,
    border: float = 0.05,
    gradient: bool = True,
    smooth: int = 3,
    threshold: float = 3.0,
    softness: float = 0.5,
    min_scale: float = 2.0,
    iterations: int = 3,
    open_radius: int = 1,
    close_radius: int = 2,
    min_area: float = 0.001,
) -> np.ndarray:
    """Foreground probability map ``(H, W)`` float32 in [0, 1] of an ``(H, W, 3)`` uint8 RGB image.

    Method in the module docstring. Parameters: ``border`` in (0, 0.5]: width of the background
    sample band as a fraction of the short side; ``gradient``: fit a linear illumination gradient
    (else a constant colour); ``smooth`` >= 1: median filter window in px applied first (1 = none);
    ``threshold`` > 0: normalised distance (in background sigmas) at which p = 0.5; ``softness`` > 0:
    width of the logistic in sigmas; ``min_scale`` > 0: floor of the per-channel background sigma in
    intensity levels (0..255); ``iterations`` >= 1: robust refits; ``open_radius``/``close_radius``
    >= 0 px (0 = skip); ``min_area`` in [0, 1): components smaller than this fraction of the image
    are zeroed. ``result >= 0.5`` equals the cleaned foreground mask.
    """
    img = _check_image(image)
    h, w = img.shape[:2]
    border = _check_float("border", border, low=0.0, high=0.5, low_open=True)
    threshold = _check_float("threshold", threshold, low=0.0, low_open=True)
    softness = _check_float("softness", softness, low=0.0, low_open=True)
    min_scale = _check_float("min_scale", min_scale, low=0.0, low_open=True)
    min_area = _check_float("min_area", min_area, low=0.0, high=1.0, high_open=True)
    smooth = _check_int("smooth", smooth, low=1)
    iterations = _check_int("iterations", iterations, low=1)
    open_radius = _check_int("open_radius", open_radius, low=0)
    close_radius = _check_int("close_radius", close_radius, low=0)

    data = img
    if smooth > 1:
        data = ndimage.median_filter(img, size=(smooth, smooth, 1), mode="nearest")
    data = data.astype(np.float32)

    # Coordinates normalised to [-1, 1] keep the plane fit well conditioned at any image size.
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float64) if w > 1 else np.zeros(1)
    ys = np.linspace(-1.0, 1.0, h, dtype=np.float64) if h > 1 else np.zeros(1)

    band = max(1, int(round(border * min(h, w))))
    ring = np.zeros((h, w), bool)
    ring[:band, :] = ring[-band:, :] = True
    ring[:, :band] = ring[:, -band:] = True
    rows, cols = np.nonzero(ring)
    stride = max(1, -(-rows.size // _MAX_BORDER_SAMPLES))
    rows, cols = rows[::stride], cols[::stride]
    samples = data[rows, cols].astype(np.float64)  # (N, 3)
    design = np.stack([np.ones(rows.size), xs[cols], ys[rows]], axis=1)  # (N, 3)

    coef = np.zeros((3, 3))  # coef[:, c] = (a_c, b_c, d_c)
    coef[0] = np.median(samples, axis=0)
    for _ in range(iterations):
        resid = samples - design @ coef
        scale = np.maximum(_MAD_TO_SIGMA * np.median(np.abs(resid - np.median(resid, axis=0)), axis=0), min_scale)
        inliers = np.all(np.abs(resid) <= 3.0 * scale, axis=1)
        if inliers.sum() < 3:  # degenerate: keep the current model
            break
        if gradient:
            coef, *_ = np.linalg.lstsq(design[inliers], samples[inliers], rcond=None)
        else:
            coef = np.zeros((3, 3))
            coef[0] = np.median(samples[inliers], axis=0)
    resid = samples - design @ coef
    scale = np.maximum(_MAD_TO_SIGMA * np.median(np.abs(resid - np.median(resid, axis=0)), axis=0), min_scale)

    model = coef[0] + xs[None, :, None] * coef[1] + ys[:, None, None] * coef[2]  # (H, W, 3)
    z = (data - model.astype(np.float32)) / scale.astype(np.float32)
    dist = np.sqrt(np.mean(z * z, axis=-1))
    prob = (1.0 / (1.0 + np.exp(-np.clip((dist - threshold) / softness, -60.0, 60.0)))).astype(np.float32)

    raw = prob >= 0.5
    clean = raw
    if open_radius > 0:
        clean = ndimage.binary_opening(clean, structure=_disc(open_radius))
    if close_radius > 0:
        # Pad so that closing near the image edge does not erode against the (implicit 0) outside.
        pad = close_radius
        closed = ndimage.binary_closing(np.pad(clean, pad, mode="edge"), structure=_disc(close_radius))
        clean = closed[pad:-pad, pad:-pad]
    clean = ndimage.binary_fill_holes(clean)
    if min_area > 0 and clean.any():
        labels, n = ndimage.label(clean, structure=np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < min_area * h * w
        small[0] = False
        clean = clean & ~small[labels]

    out = prob.copy()
    out[clean & ~raw] = 0.5
    out[~clean & raw] = 0.0
    return out


def filter_masks(
    masks: list[np.ndarray],
    fg_prob: np.ndarray,
    *,
    min_inside: float = 0.8,
    prob_threshold: float = 0.5,
) -> list[int]:
    """Indices (ascending) of the masks to keep: those with at least ``min_inside`` of their pixels in
    the foreground ``fg_prob >= prob_threshold``.

    ``masks``: bool ``(H, W)`` part masks (e.g. SAM automatic masks); ``fg_prob``: ``(H, W)``
    foreground probabilities (a bool mask also works: True counts as 1). The rule is
    ``inside / area >= min_inside`` (so exactly ``min_inside`` is kept); empty masks are never kept.
    """
    prob = _check_map("fg_prob", fg_prob)
    min_inside = _check_float("min_inside", min_inside, low=0.0, high=1.0)
    prob_threshold = _check_float("prob_threshold", prob_threshold)
    fg = prob >= prob_threshold
    kept: list[int] = []
    for i, mask in enumerate(_check_masks("masks", masks, prob.shape)):
        area = int(np.count_nonzero(mask))
        if area == 0:
            continue
        if int(np.count_nonzero(mask & fg)) / area >= min_inside:
            kept.append(i)
    return kept


def union(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Bool ``(H, W)`` union of ``masks`` (each bool ``(H, W)`` with ``shape = (H, W)``); all False
    when ``masks`` is empty."""
    hw = _check_hw("shape", shape)
    out = np.zeros(hw, bool)
    for mask in _check_masks("masks", masks, hw):
        out |= mask
    return out


def components(
    foreground: np.ndarray,
    parts: list[np.ndarray] | None = None,
    *,
    min_area: int = 0,
    connectivity: int = 8,
) -> tuple[np.ndarray, list[Component]]:
    """Connected components of a bool ``(H, W)`` foreground mask.

    Returns ``(labels, comps)``: ``labels`` int32 ``(H, W)`` with the component id at each pixel and
    -1 on background, INCLUDING the pixels of components dropped for having fewer than ``min_area``
    pixels; ``comps`` the kept components with ids 0..n-1 ordered by the ``(y0, x0)`` corner of their
    box (ties broken by ``(y1, x1)``, then raster-scan order of the first pixel).

    ``connectivity``: 8 (diagonal neighbours connect) or 4. ``parts`` (bool ``(H, W)`` masks, e.g.
    the kept SAM masks): each part is assigned to the component it overlaps most (ties: the lowest
    id; a part overlapping no kept component is not counted) and ``n_parts`` counts the parts
    assigned to each component; 0 everywhere when ``parts`` is None.
    """
    fg = _check_map("foreground", foreground)
    if fg.dtype != bool:
        raise ValueError(f"foreground must be a bool (H, W) mask, got dtype {fg.dtype}")
    min_area = _check_int("min_area", min_area, low=0)
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    structure = np.ones((3, 3), bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    raw, n = ndimage.label(fg, structure=structure)
    areas = np.bincount(raw.ravel(), minlength=n + 1)
    found: list[tuple[tuple[int, int, int, int], int, int]] = []  # (sort key, scipy label, area)
    for label, slices in enumerate(ndimage.find_objects(raw), start=1):
        if slices is None or areas[label] < min_area:
            continue
        ys, xs = slices
        found.append(((ys.start, xs.start, ys.stop, xs.stop), label, int(areas[label])))
    found.sort(key=lambda item: (item[0], item[1]))  # scipy labels follow raster-scan order

    lookup = np.full(n + 1, -1, np.int32)
    comps: list[Component] = []
    for new_id, ((y0, x0, y1, x1), label, area) in enumerate(found):
        lookup[label] = new_id
        comps.append(Component(id=new_id, box=(int(x0), int(y0), int(x1), int(y1)), area=area, n_parts=0))
    labels = lookup[raw]

    if parts is not None and comps:
        counts = np.zeros(len(comps), np.int64)
        for part in _check_masks("parts", parts, fg.shape):
            hits = labels[part]
            hits = hits[hits >= 0]
            if hits.size:
                counts[int(np.argmax(np.bincount(hits, minlength=len(comps))))] += 1
        for comp in comps:
            comp.n_parts = int(counts[comp.id])
    return labels, comps


def components_at(labels: np.ndarray, comps: list[Component],
                  shape: tuple[int, int]) -> tuple[np.ndarray, list[Component]]:
    """The foreground and components of an image found at a reduced (working) size, at its original
    size ``shape = (H, W)``: ``labels`` and ``comps`` as :func:`components` returns them for the
    reduced image (no side larger than ``shape``'s).

    Returns ``(mask, comps)``: the foreground (``labels >= 0``) enlarged by nearest neighbour
    (:func:`pipeline.ops.heatmap.resize_nearest`), and each component with its box and area in the
    original's pixels, exactly those of its pixels in that mask (nearest neighbour keeps components
    connected and apart): the box is the bounding box of the output pixels whose source pixel lies in
    the component's box, the area the count of output pixels whose source pixel is the component's
    (computed at the reduced size). Boxes stay inside ``shape`` and non-empty; ids, order and
    ``n_parts`` are unchanged."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be an (H, W) array, got shape {labels.shape}")
    h, w = labels.shape
    oh, ow = _check_hw("shape", shape)
    if oh < h or ow < w:
        raise ValueError(f"shape {(oh, ow)} is smaller than the labels' {(h, w)}: only an enlargement is exact")
    inside = labels >= 0
    rows, cols = heatmap.nearest_indices(h, oh), heatmap.nearest_indices(w, ow)
    mask = heatmap.resize_nearest(inside, (oh, ow))
    # the first output row (column) of each source row (column), and the output size after the last
    first_row = np.searchsorted(rows, np.arange(h + 1))
    first_col = np.searchsorted(cols, np.arange(w + 1))
    covered = np.outer(np.bincount(rows, minlength=h), np.bincount(cols, minlength=w))  # output px per source px
    areas = np.bincount(labels[inside], weights=covered[inside], minlength=len(comps))
    out = []
    for comp in comps:
        x0, y0, x1, y1 = comp.box
        box = (int(first_col[x0]), int(first_row[y0]), int(first_col[x1]), int(first_row[y1]))
        out.append(Component(id=comp.id, box=box, area=int(round(areas[comp.id])), n_parts=comp.n_parts))
    return mask, out


def _disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy) <= radius * radius + radius  # slightly fuller than the Euclidean disc


def _check_image(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {arr.dtype}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image must be at least 2x2 pixels, got shape {arr.shape}")
    return arr


def _check_map(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {arr.shape}")
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or numeric, got dtype {arr.dtype}")
    return arr


def _check_masks(name: str, masks: list[np.ndarray], shape: tuple[int, ...]) -> list[np.ndarray]:
    if masks is None or isinstance(masks, np.ndarray) and masks.ndim != 3:
        raise ValueError(f"{name} must be a list of bool (H, W) masks, got {type(masks).__name__}")
    out = []
    for i, mask in enumerate(masks):
        arr = np.asarray(mask)
        if arr.shape != tuple(shape):
            raise ValueError(f"{name}[{i}] has shape {arr.shape}, expected {tuple(shape)}")
        if arr.dtype != bool:
            raise ValueError(f"{name}[{i}] must be a bool mask, got dtype {arr.dtype}")
        out.append(arr)
    return out


def _check_hw(name: str, shape: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be (H, W), got {shape!r}") from exc
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def _check_float(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def _check_int(name: str, value: int, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)
