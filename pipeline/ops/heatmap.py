"""Anomaly maps as 16-bit grayscale PNGs, and bilinear resizing (pure numpy + Pillow).

Quantisation: a value ``v`` in ``[vmin, vmax]`` is stored as the integer level
``q = round_half_up((clip(v, vmin, vmax) - vmin) / (vmax - vmin) * 65535)`` (uint16) and read back as
``v' = vmin + q / 65535 * (vmax - vmin)``; so ``|v' - clip(v)| <= (vmax - vmin) / 65535 / 2`` up to
floating-point rounding. ``vmin``/``vmax`` are not stored in the PNG: the caller records them
(for anomaly probabilities they are simply 0 and 1).

Maps are indexed ``[row, col]`` with shape ``(H, W)``; sizes are ``(H, W)``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# The fixed value range of probability-like anomaly maps (every zsad pixel method): PNG level 0 is
# 0.0 and level 65535 is 1.0, so all maps of a run share one quantisation grid.
PROBABILITY_RANGE = (0.0, 1.0)


def map_shape(height: int, width: int, map_size) -> tuple[int, int]:
    """Stored map (H, W) for an image of ``height`` x ``width``: the image's own size for
    ``"original"``, else long side ``map_size`` with the aspect ratio kept (at least 1 pixel)."""
    if map_size == "original":
        return height, width
    scale = map_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))

__all__ = ["LEVELS", "quantise", "dequantise", "encode_png16", "decode_png16", "resize_map", "resize_nearest",
           "nearest_indices"]

#: The largest quantisation level (uint16).
LEVELS = 65535


def quantise(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """The uint16 levels of ``values`` (any shape): clipped to [vmin, vmax], scaled to 0..65535 and
    rounded half up. Raises ValueError on NaN/inf values or a range that is not finite with vmax > vmin."""
    lo, hi = _check_range(vmin, vmax)
    arr = np.asarray(values)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"values must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"values must be finite: {int(np.count_nonzero(~np.isfinite(arr)))} NaN/inf entries")
    scaled = (np.clip(arr, lo, hi) - lo) / (hi - lo)
    scaled = np.clip(scaled, 0.0, 1.0)  # guard against rounding just outside [0, 1]
    return np.floor(scaled * LEVELS + 0.5).astype(np.uint16)


def dequantise(levels: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """float64 values of uint16 levels: ``vmin + q / 65535 * (vmax - vmin)``."""
    lo, hi = _check_range(vmin, vmax)
    q = np.asarray(levels)
    if q.size and (q.min() < 0 or q.max() > LEVELS):
        raise ValueError(f"levels must lie in 0..{LEVELS}")
    return lo + q.astype(np.float64) / LEVELS * (hi - lo)


def encode_png16(values: np.ndarray, vmin: float, vmax: float) -> bytes:
    """A 16-bit grayscale PNG (Pillow mode ``I;16``) of the quantised 2-D map ``values``."""
    arr = _check_map(values)
    levels = quantise(arr, vmin, vmax)
    image = Image.fromarray(np.ascontiguousarray(levels.astype("<u2")))
    if image.mode != "I;16":  # pragma: no cover - depends on Pillow's fromarray mapping
        raise RuntimeError(f"Pillow produced mode {image.mode!r} for uint16 data, expected 'I;16'")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_png16_levels(data: bytes) -> np.ndarray:
    """The integer levels (H, W) int64 in 0..65535 of a PNG written by ``encode_png16``: the exact
    quantised map, for evaluation on levels."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            raise ValueError(f"expected a PNG, got {image.format}")
        if image.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"expected a 16-bit grayscale PNG, got Pillow mode {image.mode!r}")
        return np.asarray(image).astype(np.int64)


def decode_png16(data: bytes, vmin: float, vmax: float) -> np.ndarray:
    """The float64 ``(H, W)`` map stored by ``encode_png16`` (levels mapped back to [vmin, vmax])."""
    _check_range(vmin, vmax)
    return dequantise(decode_png16_levels(data), vmin, vmax)


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized to ``shape = (H, W)`` by nearest neighbour (Pillow's)."""
    if mask.shape == tuple(shape):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.NEAREST)) > 0


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """The source index (int64, length ``n_out``) of each output row (or column) of
    :func:`resize_nearest` from ``n_in`` to ``n_out``: Pillow's nearest neighbour is separable, so
    ``resize_nearest(mask, (H, W)) == mask[np.ix_(nearest_indices(h, H), nearest_indices(w, W))]``.
    Non-decreasing; when enlarging (``n_out >= n_in``) every source index appears."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    line = Image.fromarray(np.arange(n_in, dtype=np.int32)[None, :])  # mode I: Pillow's own rounding
    return np.asarray(line.resize((n_out, 1), Image.NEAREST))[0].astype(np.int64)


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``size = (H, W)``, returned as float64.

    Numpy implementation of ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, antialias=False)``: pixel centres are aligned (output index ``i`` samples
    source coordinate ``(i + 0.5) * in / out - 0.5``, clamped below at 0, neighbours clamped at the
    last index). Downsampling therefore interpolates without low-pass filtering, as torch does.
    """
    arr = _check_map(values).astype(np.float64)
    try:
        out_h, out_w = (int(s) for s in size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"size must be (H, W), got {size!r}") from exc
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {(out_h, out_w)}")
    in_h, in_w = arr.shape
    r0, r1, rw = _linear_weights(in_h, out_h)
    c0, c1, cw = _linear_weights(in_w, out_w)
    rows = arr[r0] * (1.0 - rw)[:, None] + arr[r1] * rw[:, None]
    return rows[:, c0] * (1.0 - cw)[None, :] + rows[:, c1] * cw[None, :]


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def _check_range(vmin: float, vmax: float) -> tuple[float, float]:
    lo, hi = float(vmin), float(vmax)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"vmin and vmax must be finite, got {vmin!r}, {vmax!r}")
    if not hi > lo:
        raise ValueError(f"vmax must be greater than vmin, got vmin={vmin!r}, vmax={vmax!r}")
    return lo, hi


def _check_map(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"map must be 2-D (H, W), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"map must not be empty, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"map must be numeric, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"map must be finite: {int(np.count_nonzero(~np.isfinite(arr)))} NaN/inf entries")
    return arr
