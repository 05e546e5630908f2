"""Mergeable evaluation state (METRICS.md "Computing at scale"). Pure numpy + scipy.

Every pixel metric is a function of four statistics per distinct score value v: negatives(v),
positives(v), the sum over positive pixels at v of 1 / area(their region) (for PRO), plus the
number of ground-truth regions. They merge by addition (a region never crosses images).

- :class:`LevelStats` (default for maps stored by zsad): dense 65536-level histograms of the 16-bit
  quantised maps. EXACT for those maps; memory is constant (~1.5 MB) whatever the pixel count.
- :class:`ValueTable` (float maps, exact): a sorted table of distinct values with their counts;
  tables merge by concatenation and grouping.
- :class:`BinnedStats` (float maps, streaming): fixed linear bins over known bounds plus two
  overflow bins; constant memory; reports error bounds (see :func:`pipeline.metrics.curves.binned_bounds`).

Counts are int64 (float32 cumulative sums lose exactness past 2^24).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

LEVELS = 65536
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected ground-truth regions of a binary (H, W) mask: (label image, area per label),
    label 0 = background, area[0] unused."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def _pixel_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel 1 / area(region) for positive pixels (0 elsewhere), and the number of regions."""
    labels, area = regions(mask)
    inv = np.zeros(area.shape, dtype=np.float64)
    inv[1:] = 1.0 / np.maximum(area[1:], 1)
    return inv[labels], len(area) - 1


def _check(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, mask = np.asarray(values), np.asarray(mask, dtype=bool)
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(f"map {values.shape} and mask {mask.shape} must be 2-D arrays of the same shape")
    return values, mask


def _accumulate(state, idx: np.ndarray, mask: np.ndarray, size: int) -> int:
    """Add one image's pixels (bin/level index per pixel, flattened) to ``state.neg/pos/pro``;
    returns the image's number of regions."""
    m = mask.ravel()
    state.neg += np.bincount(idx[~m], minlength=size)
    state.pos += np.bincount(idx[m], minlength=size)
    weights, n = _pixel_weights(mask)
    state.pro += np.bincount(idx[m], weights=weights.ravel()[m], minlength=size)
    return n


@dataclass
class LevelStats:
    """Dense per-level statistics of 16-bit maps (levels 0..65535)."""

    neg: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS, np.int64))
    pos: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS, np.int64))
    pro: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS, np.float64))
    n_regions: int = 0

    def add(self, levels: np.ndarray, mask: np.ndarray) -> "LevelStats":
        """Add one image: ``levels`` (H, W) integers in [0, 65535], ``mask`` (H, W) ground truth."""
        levels, mask = _check(levels, mask)
        if levels.size and (levels.min() < 0 or levels.max() >= LEVELS):
            raise ValueError("levels must lie in [0, 65535]")
        self.n_regions += _accumulate(self, levels.astype(np.int64).ravel(), mask, LEVELS)
        return self

    def merge(self, other: "LevelStats") -> "LevelStats":
        return LevelStats(
            self.neg + other.neg, self.pos + other.pos, self.pro + other.pro, self.n_regions + other.n_regions
        )

    def table(self, vmin: float = 0.0, vmax: float = 1.0) -> "ValueTable":
        """The equivalent :class:`ValueTable` (levels mapped back to map values)."""
        used = np.flatnonzero((self.neg + self.pos) > 0)
        values = vmin + used / (LEVELS - 1) * (vmax - vmin)
        return ValueTable(values, self.neg[used].copy(), self.pos[used].copy(), self.pro[used].copy(), self.n_regions)


@dataclass
class ValueTable:
    """Sorted distinct values (ascending) with negatives, positives and PRO weights per value."""

    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pro: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_regions: int = 0

    @classmethod
    def from_pixels(cls, values: np.ndarray, mask: np.ndarray) -> "ValueTable":
        values, mask = _check(values, mask)
        if not np.isfinite(values).all():
            raise ValueError("map values must be finite")
        weights, n = _pixel_weights(mask)
        uniq, inv = np.unique(values.ravel().astype(np.float64), return_inverse=True)
        m = mask.ravel()
        k = len(uniq)
        return cls(
            uniq,
            np.bincount(inv[~m], minlength=k).astype(np.int64),
            np.bincount(inv[m], minlength=k).astype(np.int64),
            np.bincount(inv[m], weights=weights.ravel()[m], minlength=k),
            n,
        )

    @classmethod
    def from_scores(cls, scores: np.ndarray, labels: np.ndarray) -> "ValueTable":
        """Image level: one 'pixel' per image (no regions)."""
        return _scores_table(np.asarray(scores, dtype=np.float64).ravel(), labels)

    def merge(self, *others: "ValueTable") -> "ValueTable":
        tables = (self, *others)
        values = np.concatenate([t.values for t in tables])
        uniq, inv = np.unique(values, return_inverse=True)
        k = len(uniq)
        return ValueTable(
            uniq,
            _sum(inv, [t.neg for t in tables], k),
            _sum(inv, [t.pos for t in tables], k),
            np.bincount(inv, weights=np.concatenate([t.pro for t in tables]), minlength=k),
            sum(t.n_regions for t in tables),
        )


def _sum(inv: np.ndarray, parts: list[np.ndarray], k: int) -> np.ndarray:
    """Exact int64 group sums (np.bincount with weights would go through float64)."""
    out = np.zeros(k, np.int64)
    np.add.at(out, inv, np.concatenate(parts).astype(np.int64))
    return out


def _scores_table(scores: np.ndarray, labels: np.ndarray) -> ValueTable:
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    uniq, inv = np.unique(scores, return_inverse=True)
    k = len(uniq)
    return ValueTable(
        uniq,
        np.bincount(inv[~labels], minlength=k).astype(np.int64),
        np.bincount(inv[labels], minlength=k).astype(np.int64),
        np.zeros(k),
        0,
    )


@dataclass
class BinnedStats:
    """Streaming mode for float maps: ``bins`` linear bins over [lo, hi] plus an underflow and an
    overflow bin (index 0 and bins + 1). A binned metric is the exact metric of the quantised scores."""

    lo: float
    hi: float
    bins: int = LEVELS
    neg: np.ndarray | None = None
    pos: np.ndarray | None = None
    pro: np.ndarray | None = None
    n_regions: int = 0

    def __post_init__(self) -> None:
        if not self.hi > self.lo:
            raise ValueError("binned mode needs hi > lo")
        if self.bins < LEVELS:
            raise ValueError(f"binned mode needs at least {LEVELS} bins")
        n = self.bins + 2
        self.neg = np.zeros(n, np.int64) if self.neg is None else self.neg
        self.pos = np.zeros(n, np.int64) if self.pos is None else self.pos
        self.pro = np.zeros(n) if self.pro is None else self.pro

    def index(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        idx = np.floor((v - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64) + 1
        idx = np.clip(idx, 1, self.bins)
        idx[v < self.lo] = 0
        idx[v > self.hi] = self.bins + 1
        return idx

    def add(self, values: np.ndarray, mask: np.ndarray) -> "BinnedStats":
        values, mask = _check(values, mask)
        self.n_regions += _accumulate(self, self.index(values).ravel(), mask, self.bins + 2)
        return self

    def merge(self, other: "BinnedStats") -> "BinnedStats":
        if (self.lo, self.hi, self.bins) != (other.lo, other.hi, other.bins):
            raise ValueError("binned states with different bins cannot be merged")
        return BinnedStats(
            self.lo,
            self.hi,
            self.bins,
            self.neg + other.neg,
            self.pos + other.pos,
            self.pro + other.pro,
            self.n_regions + other.n_regions,
        )

    def table(self) -> ValueTable:
        used = np.flatnonzero((self.neg + self.pos) > 0)
        return ValueTable(
            used.astype(np.float64), self.neg[used].copy(), self.pos[used].copy(), self.pro[used].copy(), self.n_regions
        )
