"""Prompt points for SAM's mask decoder from a CLIP anomaly map (METHODS.md section 6, the CLIP-SAM
refinement cascade), pure numpy + scipy.

The idea is the CLIP-SAM collaboration paper's (re-implemented from its text, which has no public
code): the zero-shot CLIP anomaly map S says roughly WHERE a defect is; SAM, prompted with points
derived from S, says precisely WHAT its extent is.

- :func:`extreme_region`: the extreme-anomaly region R, S thresholded (absolute value, fraction of the
  maximum, or quantile).
- :func:`positive_points`: the top-k scores of ``S * R``, kept at least a minimum spacing apart
  (:func:`spaced_top_k`; the paper states "400 pixels", which may be a plain or a SQUARED distance,
  so both readings are offered).
- :func:`ring`: N = dilate(R) minus R with an elliptical kernel (25 x 25 was the best in the paper's
  ablation over cross / rectangle / ellipse at 20 / 25 / 30), :func:`ellipse_kernel` being OpenCV's
  ``MORPH_ELLIPSE`` element re-derived exactly.
- :func:`negative_points`: SAM image-embedding features pooled over R (F_a, :func:`pooled_feature`);
  the ring pixels whose feature is LEAST similar (cosine) to F_a, same spacing rule. The paper also
  pools a ring feature F_n; the point choice only needs F_a (``pooled_feature`` over the ring gives
  F_n if a caller wants it).
- :func:`bounding_box`: the box prompt of cascade step 3 (the box of the step-2 mask).

The decoder cascade itself (points -> M1/L1; points + L1 -> M2/L2; points + box(M2) + L2 -> M3) runs
the model and lives in ``pipeline.models``; this module only prepares its prompts.

Conventions
-----------
- Maps and masks are ``(H, W)`` arrays indexed ``[row, col]`` at ORIGINAL image resolution (the
  resolution SAM's ``predict`` takes point coordinates in).
- Points are ``(M, 2)`` int64 arrays of ``(x, y)`` = ``(col, row)``: SAM's ``point_coords`` order.
- Boxes are SAM's XYXY with INCLUSIVE maxima (as ``segment_anything.utils.amg.batched_mask_to_box``
  and the SamPredictor examples): ``(x0, y0, x1, y1) = (min col, min row, max col, max row)``.
  NB this differs from ``pipeline.ops.tiling``/``foreground`` whose boxes have exclusive maxima.
- SAM features are ``(C, g, g)``: the image embedding (``g = 64`` for the 1024 px encoders, one cell
  per 16 x 16 input pixels) of the padded ``S x S`` square (``S = 16 g``) whose top-left ``(h, w)``
  holds the image resized so that its longest side is ``S`` (``input_size = (h, w)`` as SAM's
  ``ResizeLongestSide.get_preprocess_shape``; ``original_size = (H, W)``).

Ties and determinism
--------------------
Point selection is deterministic: candidates are visited by decreasing score and, among equal
scores, in row-major ``(row, col)`` order (the first row first, then the first column).

Defaults (module constants, so the job spec can reference them)
---------------------------------------------------------------
- ``DEFAULT_POSITIVE_K = DEFAULT_NEGATIVE_K = 5``: the paper does not pin k in the text we follow;
  5 + 5 = 10 points keeps the prompt near what SAM's decoder saw in training (one initial prompt plus
  up to 8 iteratively added points), while several positives let SAM cover a defect that is not
  convex.
- ``DEFAULT_MIN_DISTANCE = 20.0`` plain pixels with ``DEFAULT_SQUARED = False``: the paper's "400"
  read as a SQUARED distance (20 = sqrt(400)). A plain 400 px spacing would allow one point on any
  defect smaller than 400 px across (most of them at 1024 px), which would make k meaningless;
  ``squared=True, min_distance=400`` is the same rule written the other way.
- ``DEFAULT_RING_KERNEL = 25`` (the paper's ablation winner).
- ``DEFAULT_REGION_MODE = "fraction"``, ``DEFAULT_REGION_VALUE = 0.8``: R = pixels at 80% of the
  map's maximum or more; relative to the maximum so it works on uncalibrated maps whatever their
  scale. A starting default to tune, like all the others.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import ndimage

__all__ = [
    "DEFAULT_MIN_DISTANCE",
    "DEFAULT_NEGATIVE_K",
    "DEFAULT_POSITIVE_K",
    "DEFAULT_REGION_MODE",
    "DEFAULT_REGION_VALUE",
    "DEFAULT_RING_KERNEL",
    "DEFAULT_SQUARED",
    "REGION_MODES",
    "bounding_box",
    "ellipse_kernel",
    "extreme_region",
    "negative_points",
    "pooled_feature",
    "positive_points",
    "ring",
    "spaced_top_k",
]

DEFAULT_POSITIVE_K = 5
DEFAULT_NEGATIVE_K = 5
DEFAULT_MIN_DISTANCE = 20.0  # plain pixels = sqrt(400): the paper's "400" read as a squared distance
DEFAULT_SQUARED = False
DEFAULT_RING_KERNEL = 25
DEFAULT_REGION_MODE = "fraction"
DEFAULT_REGION_VALUE = 0.8
REGION_MODES = ("absolute", "fraction", "quantile")

# Candidates are checked against the chosen points in blocks of this many: memory O(block), never
# O(candidates^2) (and never O(candidates x chosen) at once either).
_BLOCK = 4096
# Cosine similarity denominators are floored here (as torch.nn.functional.cosine_similarity does).
_COS_EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# validation helpers


def _map2d(name: str, array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _mask2d(name: str, mask: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = _map2d(name, mask)
    if arr.dtype != bool:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name} must be a boolean mask (or 0/1 values), got dtype {arr.dtype} with other values")
        arr = arr.astype(bool)
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _size(name: str, size) -> tuple[int, int]:
    try:
        h, w = size
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a pair (h, w), got {size!r}") from exc
    return _int(f"{name}[0] (height)", h, 1), _int(f"{name}[1] (width)", w, 1)


def _features(features: np.ndarray) -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"features must be a (C, g, g) SAM image embedding, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"features must be numeric, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"features must be finite: {int(np.count_nonzero(~np.isfinite(arr)))} NaN/inf entries")
    return arr


def _empty_points() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# region and positive points


def extreme_region(
    anomaly_map: np.ndarray, mode: str = DEFAULT_REGION_MODE, value: float = DEFAULT_REGION_VALUE
) -> np.ndarray:
    """The extreme-anomaly region R of an anomaly map.

    Args:
        anomaly_map: ``(H, W)`` finite, non-constant real map (higher = more anomalous).
        mode: ``"absolute"``: ``map >= value``; ``"fraction"``: ``map >= value * map.max()``
            (``value`` in ``[0, 1]``, the map's maximum must be positive); ``"quantile"``:
            ``map >= np.quantile(map, value)`` (``value`` in ``[0, 1]``, linear interpolation).
        value: the threshold parameter of ``mode``.

    Returns:
        ``(H, W)`` bool mask. May be empty in ``"absolute"`` mode (every pixel below ``value``);
        never empty in the other two modes (the maximum always qualifies).

    Raises:
        ValueError: a non-2-D or empty map, a NaN/inf anywhere, a constant map (max == min: there is
            no "extreme" part), an unknown mode or a value outside its mode's range.
    """
    arr = _map2d("anomaly_map", anomaly_map)
    if arr.dtype == bool:
        raise ValueError("anomaly_map must be a real-valued map, got a boolean mask")
    arr = arr.astype(np.float64, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise ValueError(f"anomaly_map must be finite: {bad} NaN/inf pixels")
    lo, hi = float(arr.min()), float(arr.max())
    if hi == lo:
        raise ValueError(f"anomaly_map is constant (every pixel = {hi!r}): no extreme region can be defined")
    if mode not in REGION_MODES:
        raise ValueError(f"mode must be one of {REGION_MODES}, got {mode!r}")
    value = _real("value", value)
    if mode == "absolute":
        threshold = value
    elif mode == "fraction":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"value must be in [0, 1] for mode 'fraction', got {value!r}")
        if hi <= 0.0:
            raise ValueError(f"mode 'fraction' needs a positive map maximum, got max {hi!r}")
        threshold = value * hi
    else:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"value must be in [0, 1] for mode 'quantile', got {value!r}")
        threshold = float(np.quantile(arr, value))
    return arr >= threshold


def spaced_top_k(
    scores: np.ndarray, candidates: np.ndarray, k: int, min_distance: float, squared: bool = False
) -> np.ndarray:
    """Greedy top-k candidate pixels by score, kept at least ``min_distance`` apart.

    Candidates are visited by decreasing score, ties in row-major ``(row, col)`` order; a candidate
    is taken unless it is closer than ``min_distance`` (Euclidean, in pixels) to a point already
    taken: it is kept when ``dx^2 + dy^2 >= min_distance^2``, or with ``squared=True`` when
    ``dx^2 + dy^2 >= min_distance`` (``min_distance`` then IS a squared distance). Stops after ``k``
    points or when the candidates run out. Each candidate is compared only with the (at most ``k``)
    chosen points, in blocks, so big images never materialise pairwise distances.

    Args:
        scores: ``(H, W)`` real array; must be finite at the candidate pixels (elsewhere ignored).
        candidates: ``(H, W)`` bool mask of the pixels that may be chosen.
        k: most points to return, ``>= 0``.
        min_distance: ``>= 0``; 0 disables the spacing.
        squared: whether ``min_distance`` is a squared distance.

    Returns:
        ``(M, 2)`` int64 array of ``(x, y)`` = ``(col, row)``, ``M <= k``, in the order chosen
        (highest score first).
    """
    sc = _map2d("scores", scores)
    cand = _mask2d("candidates", candidates, sc.shape)
    k = _int("k", k, 0)
    min_distance = _real("min_distance", min_distance)
    if min_distance < 0:
        raise ValueError(f"min_distance must be >= 0, got {min_distance!r}")
    threshold = min_distance if squared else min_distance * min_distance

    flat = np.flatnonzero(cand)  # row-major order: the tie order
    values = sc.reshape(-1)[flat].astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ValueError(f"scores must be finite at the candidate pixels: {bad} NaN/inf candidates")
    if k == 0 or flat.size == 0:
        return _empty_points()
    order = np.argsort(-values, kind="stable")  # stable: equal scores keep row-major order
    width = sc.shape[1]
    rows = (flat[order] // width).astype(np.int64)
    cols = (flat[order] % width).astype(np.int64)

    chosen: list[tuple[int, int]] = []  # (x, y)
    for start in range(0, rows.size, _BLOCK):
        r = rows[start : start + _BLOCK]
        c = cols[start : start + _BLOCK]
        alive = np.ones(r.size, dtype=bool)
        for x, y in chosen:
            alive &= (c - x) ** 2 + (r - y) ** 2 >= threshold
        while True:
            hits = np.flatnonzero(alive)
            if hits.size == 0:
                break
            i = int(hits[0])
            x, y = int(c[i]), int(r[i])
            chosen.append((x, y))
            if len(chosen) == k:
                return np.asarray(chosen, dtype=np.int64).reshape(-1, 2)
            alive[: i + 1] = False
            alive &= (c - x) ** 2 + (r - y) ** 2 >= threshold
    return np.asarray(chosen, dtype=np.int64).reshape(-1, 2) if chosen else _empty_points()


def positive_points(
    anomaly_map: np.ndarray,
    region: np.ndarray,
    k: int = DEFAULT_POSITIVE_K,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    squared: bool = DEFAULT_SQUARED,
) -> np.ndarray:
    """Positive prompt points: :func:`spaced_top_k` of ``anomaly_map * region`` over ``region``.

    Args:
        anomaly_map: ``(H, W)`` real map, finite inside ``region``.
        region: ``(H, W)`` bool extreme region R (:func:`extreme_region`).
        k, min_distance, squared: as :func:`spaced_top_k` (defaults ``DEFAULT_POSITIVE_K = 5``,
            ``DEFAULT_MIN_DISTANCE = 20.0`` plain px, ``DEFAULT_SQUARED = False``).

    Returns:
        ``(M, 2)`` int64 ``(x, y)`` points, ``M <= k``; ``(0, 2)`` for an empty region.
    """
    amap = _map2d("anomaly_map", anomaly_map)
    reg = _mask2d("region", region, amap.shape)
    scores = np.where(reg, amap, 0.0)  # = map * R without turning a NaN outside R into a NaN score
    return spaced_top_k(scores, reg, k, min_distance, squared)


# ---------------------------------------------------------------------------------------------
# ring and negative points


def ellipse_kernel(kernel: int) -> np.ndarray:
    """OpenCV's ``getStructuringElement(MORPH_ELLIPSE, (kernel, kernel))`` as a bool array.

    Derivation (OpenCV's ``getStructuringElement``, square ``k x k`` case): the semi-axes are the
    INTEGER halves ``r = c = k // 2`` (not ``k / 2``) and the centre is ``(k // 2, k // 2)``. Row ``i``
    has ``dy = i - r``; since ``|dy| <= r`` always, the row's half-width is
    ``dx = cvRound(c * sqrt((r^2 - dy^2) / r^2)) = round(sqrt(r^2 - dy^2))`` (because ``c = r``) and
    the row holds columns ``c - dx .. c + dx`` inclusive (clipped to the grid, never needed here).
    ``cvRound`` rounds half to even, but ``sqrt`` of a non-negative integer is either an integer or
    irrational, never ``n + 0.5``, so ordinary rounding gives the same result. Hence 5 x 5: half-widths
    ``0, 2, 2, 2, 0`` (a full 5 x 3 band plus the two tips); 7 x 7: ``0, 2, 3, 3, 3, 2, 0``.

    Args:
        kernel: odd size ``>= 3``.

    Returns:
        ``(kernel, kernel)`` bool array.
    """
    k = _int("kernel", kernel, 3)
    if k % 2 == 0:
        raise ValueError(f"kernel must be odd (the ellipse needs a centre pixel), got {k}")
    r = k // 2
    dy = np.arange(k) - r
    half = np.rint(np.sqrt(r * r - dy * dy)).astype(np.int64)
    cols = np.arange(k)
    return np.abs(cols[None, :] - r) <= half[:, None]


def ring(region: np.ndarray, kernel: int = DEFAULT_RING_KERNEL) -> np.ndarray:
    """The ring N around R: ``dilate(R, ellipse_kernel(kernel)) & ~R``.

    Dilation outside the image is clipped (a region touching the border is fine); an empty region
    has an empty ring.

    Args:
        region: ``(H, W)`` bool region R.
        kernel: odd elliptical kernel size ``>= 3`` (default ``DEFAULT_RING_KERNEL = 25``).

    Returns:
        ``(H, W)`` bool mask.
    """
    reg = _mask2d("region", region)
    structure = ellipse_kernel(kernel)  # symmetric, so scipy's reflection of the element is moot
    if not reg.any():
        return np.zeros_like(reg)
    return ndimage.binary_dilation(reg, structure=structure) & ~reg


def _cells(original_size: tuple[int, int], input_size: tuple[int, int], g: int) -> tuple[np.ndarray, np.ndarray]:
    """Embedding row of every original row and embedding column of every original column.

    Pixel centre ``x + 0.5`` lands at ``(x + 0.5) * w / W`` in the resized image, cell
    ``floor(that / 16)``; computed in exact integer arithmetic as ``((2x + 1) w) // (32 W)``.
    """
    H, W = original_size
    h, w = input_size
    row_of_y = np.minimum(((2 * np.arange(H, dtype=np.int64) + 1) * h) // (32 * H), g - 1)
    col_of_x = np.minimum(((2 * np.arange(W, dtype=np.int64) + 1) * w) // (32 * W), g - 1)
    return row_of_y, col_of_x


def _check_sizes(feats: np.ndarray, input_size, original_size) -> tuple[tuple[int, int], tuple[int, int], int]:
    g = feats.shape[1]
    h, w = _size("input_size", input_size)
    H, W = _size("original_size", original_size)
    if max(h, w) > 16 * g:
        raise ValueError(
            f"input_size {(h, w)} does not fit the {16 * g} x {16 * g} square covered by a {g} x {g} embedding"
        )
    return (h, w), (H, W), g


def pooled_feature(
    features: np.ndarray, region: np.ndarray, input_size: tuple[int, int], original_size: tuple[int, int]
) -> np.ndarray:
    """Mean of the SAM embedding feature of every pixel of ``region`` (each pixel counts once).

    Pixel ``(x, y)`` of the original image has the feature of embedding cell column
    ``floor((x + 0.5) * w / W / 16)`` and row ``floor((y + 0.5) * h / H / 16)`` (``(h, w) =
    input_size``, ``(H, W) = original_size``), clipped to ``[0, g - 1]``. Computed as a
    pixel-count-weighted mean over embedding cells (no ``(pixels, C)`` array).

    Args:
        features: ``(C, g, g)`` image embedding.
        region: ``(H, W)`` non-empty bool mask, ``(H, W) = original_size``.
        input_size: ``(h, w)`` of the resized image inside the ``16 g`` square.
        original_size: ``(H, W)`` of the original image.

    Returns:
        ``(C,)`` float64 vector.
    """
    feats = _features(features)
    (h, w), (H, W), g = _check_sizes(feats, input_size, original_size)
    reg = _mask2d("region", region, (H, W))
    n = int(np.count_nonzero(reg))
    if n == 0:
        raise ValueError("region is empty: there is nothing to pool features over")
    row_of_y, col_of_x = _cells((H, W), (h, w), g)
    ys, xs = np.nonzero(reg)
    counts = np.bincount(row_of_y[ys] * g + col_of_x[xs], minlength=g * g).astype(np.float64)
    return feats.reshape(feats.shape[0], g * g).astype(np.float64) @ counts / n


def negative_points(
    features: np.ndarray,
    region: np.ndarray,
    ring_mask: np.ndarray,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    k: int = DEFAULT_NEGATIVE_K,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    squared: bool = DEFAULT_SQUARED,
) -> np.ndarray:
    """Negative prompt points: the ring pixels least similar to the region's pooled SAM feature.

    ``F_a = pooled_feature(features, region)``; every ring pixel is scored by the cosine similarity
    of its feature (its cell's, mapped as in :func:`pooled_feature`) to ``F_a`` (norms floored at
    1e-8, so a zero feature scores 0); the ``k`` LOWEST similarities are taken with :func:`spaced_top_k`
    on the negated similarity (same tie order: many ring pixels share an embedding cell, and among
    them row-major order decides).

    Args:
        features: ``(C, g, g)`` image embedding.
        region: ``(H, W)`` bool region R, non-empty when the ring is not.
        ring_mask: ``(H, W)`` bool candidates (normally :func:`ring` of ``region``).
        input_size, original_size: as :func:`pooled_feature`.
        k, min_distance, squared: as :func:`spaced_top_k` (defaults ``DEFAULT_NEGATIVE_K = 5``,
            ``DEFAULT_MIN_DISTANCE = 20.0`` plain px, ``DEFAULT_SQUARED = False``).

    Returns:
        ``(M, 2)`` int64 ``(x, y)`` points, ``M <= k``; ``(0, 2)`` for an empty ring.
    """
    feats = _features(features)
    (h, w), (H, W), g = _check_sizes(feats, input_size, original_size)
    reg = _mask2d("region", region, (H, W))
    ring_m = _mask2d("ring_mask", ring_mask, (H, W))
    k = _int("k", k, 0)
    if not ring_m.any():
        return _empty_points()
    f_a = pooled_feature(feats, reg, (h, w), (H, W))
    cells = feats.reshape(feats.shape[0], g * g).astype(np.float64)
    norms = np.maximum(np.linalg.norm(cells, axis=0), _COS_EPS) * max(float(np.linalg.norm(f_a)), _COS_EPS)
    similarity = (f_a @ cells / norms).reshape(g, g)
    row_of_y, col_of_x = _cells((H, W), (h, w), g)
    pixel_similarity = similarity[row_of_y[:, None], col_of_x[None, :]]
    return spaced_top_k(-pixel_similarity, ring_m, k, min_distance, squared)


# ---------------------------------------------------------------------------------------------
# box prompt


def bounding_box(mask: np.ndarray) -> np.ndarray | None:
    """SAM box prompt of a mask: ``(x0, y0, x1, y1) = (min col, min row, max col, max row)``.

    Maxima are INCLUSIVE, as ``segment_anything.utils.amg.batched_mask_to_box`` (a single pixel at
    ``(x, y)`` gives ``(x, y, x, y)``).

    Args:
        mask: ``(H, W)`` bool mask.

    Returns:
        ``(4,)`` float64 array, or ``None`` for an empty mask.
    """
    m = _mask2d("mask", mask)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)
