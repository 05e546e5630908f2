"""COCO run-length encoding of binary masks (pure numpy; same format as pycocotools).

Conventions
-----------
- A mask is a 2-D array indexed ``mask[row, col]`` of shape ``(H, W)``; nonzero = foreground.
  ``size`` is ``[H, W]`` (rows, columns), as in COCO.
- Runs are taken over the mask flattened in COLUMN-MAJOR (Fortran) order: down the first column,
  then down the second, ... The run lengths alternate background/foreground and always START WITH
  A RUN OF ZEROS (possibly of length 0), so ``counts[0]`` is the number of leading background
  pixels, ``counts[1]`` the following foreground pixels, and so on. The counts sum to ``H * W``.
  Like pycocotools, an empty mask (``H * W == 0``) encodes as the single count ``[0]``, an all-zero
  mask as ``[H * W]`` and an all-one mask as ``[0, H * W]``.
- Compressed ``counts`` (COCO's string form, pycocotools' ``rleToString``): each count ``x`` is
  first replaced, for index ``i > 2``, by the difference ``counts[i] - counts[i - 2]`` (which may
  be negative). The (signed) value is then written as little-endian groups of 5 bits, one character
  per group: ``c = x & 0x1f``; ``x >>= 5`` (arithmetic shift); more groups follow while
  ``x != -1`` if bit 0x10 of ``c`` is set (the sign bit of the group) or ``x != 0`` otherwise;
  a continuation is flagged by setting bit 0x20; the character is ``chr(c + 48)``.
  Decoding reverses this, sign-extending from bit 0x10 of the last group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["counts_from_mask", "compress_counts", "decompress_counts", "encode", "decode", "area"]


def counts_from_mask(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts of a 2-D mask (column-major runs starting with zeros)."""
    mask = _as_mask(mask)
    flat = mask.ravel(order="F")
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs.insert(0, 0)
    return [int(r) for r in runs]


def compress_counts(counts: list[int]) -> str:
    """COCO's compressed string form of a list of run lengths (see the module docstring)."""
    out: list[str] = []
    for i, count in enumerate(counts):
        x = int(count)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def decompress_counts(s: str | bytes) -> list[int]:
    """Run lengths from COCO's compressed string form (inverse of ``compress_counts``)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("truncated compressed RLE counts string")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {s[p]!r} in compressed RLE counts")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict[str, Any]:
    """``{"size": [H, W], "counts": str}``: the COCO compressed RLE of a 2-D bool/integer mask."""
    mask = _as_mask(mask)
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": compress_counts(counts_from_mask(mask))}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """The ``(H, W)`` bool mask of an RLE with compressed (str/bytes) or uncompressed (list) counts."""
    h, w = _size(rle)
    counts = _counts(rle)
    total = h * w
    if sum(counts) != total:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected H * W = {total}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")


def area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels (the sum of the odd-indexed run lengths)."""
    _size(rle)
    return int(sum(_counts(rle)[1::2]))


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype != bool:
        if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
            raise ValueError(f"mask must be bool or numeric, got dtype {mask.dtype}")
        mask = mask != 0
    return mask


def _size(rle: dict[str, Any]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in rle["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"RLE needs 'size': [H, W], got {rle.get('size') if isinstance(rle, dict) else rle!r}"
        ) from exc
    if h < 0 or w < 0:
        raise ValueError(f"RLE size must be non-negative, got {[h, w]}")
    return h, w


def _counts(rle: dict[str, Any]) -> list[int]:
    if "counts" not in rle:
        raise ValueError("RLE needs 'counts' (compressed string or list of run lengths)")
    raw = rle["counts"]
    counts = decompress_counts(raw) if isinstance(raw, (str, bytes)) else [int(c) for c in raw]
    if any(c < 0 for c in counts):
        raise ValueError("RLE counts must be non-negative")
    return counts
