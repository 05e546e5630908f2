"""Exact metrics from a :class:`~pipeline.metrics.state.ValueTable` (METRICS.md definitions).

Label 1 = anomalous; higher score = more anomalous; predict anomalous when score >= t; t runs over
every distinct value, so the metrics are exact for the values in the table.

- AUROC: Mann-Whitney statistic, ties count 1/2 (= scikit-learn ``roc_auc_score``).
- AP: step sum over distinct thresholds in descending order, sum_k (R_k - R_{k-1}) P_k
  (= scikit-learn ``average_precision_score``); not the trapezoidal "AUPR".
- F1-max: max over thresholds of 2TP / (2TP + FP + FN).
- AUPRO (MVTec): curve of (FPR, PRO) with one point per distinct value plus (0, 0), trapezoid from
  FPR 0 to ``limit`` with PRO linearly interpolated at exactly ``limit``, divided by ``limit``.
- AUPRO ``fixed_grid_200``: the APRIL-GAN / AnomalyCLIP variant (200 linear thresholds between the
  min and max score, strict ``>``, keep FPR < limit, rescale FPR to [0, 1], trapezoid integral taken
  in threshold order as ``sklearn.metrics.auc`` does); only to reproduce paper tables.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics.state import ValueTable


def _desc(table: ValueTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP, FP and PRO weight at each threshold, thresholds descending."""
    return np.cumsum(table.pos[::-1]), np.cumsum(table.neg[::-1]), np.cumsum(table.pro[::-1])


def auroc(table: ValueTable) -> float:
    p, n = int(table.pos.sum()), int(table.neg.sum())
    if p == 0 or n == 0:
        return math.nan
    neg_below = np.concatenate([[0], np.cumsum(table.neg)[:-1]])  # negatives strictly below each value
    # 2 * (sum pos * neg_below + 1/2 sum pos * neg_equal), in exact integers
    twice = 2 * int(np.dot(table.pos.astype(object), neg_below.astype(object))) + int(
        np.dot(table.pos.astype(object), table.neg.astype(object))
    )
    return twice / (2 * p * n)


def average_precision(table: ValueTable) -> float:
    p = int(table.pos.sum())
    if p == 0:
        return math.nan
    tp, fp, _ = _desc(table)
    keep = (tp + fp) > 0
    tp, fp = tp[keep], fp[keep]
    precision = tp / (tp + fp)
    recall = tp / p
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def f1_max(table: ValueTable) -> float:
    p = int(table.pos.sum())
    if p == 0:
        return math.nan
    tp, fp, _ = _desc(table)
    fn = p - tp
    return float(np.max(2 * tp / np.maximum(2 * tp + fp + fn, 1)))


def pro_curve(table: ValueTable) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points, thresholds descending, starting at (0, 0)."""
    n = int(table.neg.sum())
    _, fp, pro = _desc(table)
    fpr = np.concatenate([[0.0], fp / n])
    pros = np.concatenate([[0.0], pro / table.n_regions])
    return fpr, pros


def aupro(table: ValueTable, limit: float = 0.3) -> float:
    if table.n_regions == 0 or int(table.neg.sum()) == 0:
        return math.nan
    if not 0 < limit <= 1:
        raise ValueError("AUPRO limit must be in (0, 1]")
    fpr, pro = pro_curve(table)
    k = int(np.searchsorted(fpr, limit, side="right"))  # first point with fpr > limit
    x, y = fpr[:k], pro[:k]
    if k < len(fpr) and x[-1] < limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        x = np.append(x, limit)
        y = np.append(y, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / limit)


def aupro_fixed_grid_200(table: ValueTable, limit: float = 0.3) -> float:
    """APRIL-GAN / AnomalyCLIP's AUPRO: 200 linear thresholds, FPR < limit kept, FPR rescaled."""
    if table.n_regions == 0 or int(table.neg.sum()) == 0:
        return math.nan
    lo, hi = float(table.values.min()), float(table.values.max())
    delta = (hi - lo) / 200
    if delta == 0:
        return math.nan
    n = int(table.neg.sum())
    fprs, pros = [], []
    for th in np.arange(lo, hi, delta):
        above = table.values > th
        fprs.append(table.neg[above].sum() / n)
        pros.append(table.pro[above].sum() / table.n_regions)
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    fprs, pros = fprs[keep], pros[keep]
    if len(fprs) < 2 or fprs.max() == fprs.min():
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return _auc_in_order(fprs, pros)


def _auc_in_order(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under the points in the order given (``sklearn.metrics.auc``): x must be
    monotonic; a non-increasing x (thresholds ascending, so FPR falls) gives the area with its sign
    flipped. Points that share an x stay in their order, so which y meets the next x is the one the
    threshold order puts there (sorting by x would pick one arbitrarily)."""
    dx = np.diff(x)
    if np.all(dx >= 0):
        direction = 1.0
    elif np.all(dx <= 0):
        direction = -1.0
    else:
        raise ValueError("x is neither increasing nor decreasing")
    return float(direction * np.trapezoid(y, x))


def roc_points(table: ValueTable) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, thresholds descending, from (0, 0) to (1, 1); empty
    arrays when one class is missing."""
    p, n = int(table.pos.sum()), int(table.neg.sum())
    if p == 0 or n == 0:
        return np.zeros(0), np.zeros(0)
    tp, fp, _ = _desc(table)
    return np.concatenate([[0.0], fp / n]), np.concatenate([[0.0], tp / p])


def pr_points(table: ValueTable) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, thresholds descending (the points the AP
    step sum runs over); empty arrays without positives."""
    p = int(table.pos.sum())
    if p == 0:
        return np.zeros(0), np.zeros(0)
    tp, fp, _ = _desc(table)
    keep = (tp + fp) > 0
    tp, fp = tp[keep], fp[keep]
    return tp / p, tp / (tp + fp)


def f1_max_threshold(table: ValueTable) -> float:
    """The score t at which F1-max is reached (predict anomalous when score >= t; the highest such
    t when several tie); NaN without positives."""
    p = int(table.pos.sum())
    if p == 0:
        return math.nan
    tp, fp, _ = _desc(table)
    f1 = 2 * tp / np.maximum(2 * tp + fp + (p - tp), 1)
    return float(table.values[::-1][int(np.argmax(f1))])


def thin(x: np.ndarray, y: np.ndarray, max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` points of a monotone curve for plotting, evenly spaced along its
    length (|dx| + |dy|), so that steep and flat parts both keep their shape; first and last points
    kept. A display aid, never used for a metric."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))])
    marks = np.linspace(0.0, length[-1], max_points)
    idx = np.unique(np.concatenate([[0, len(x) - 1], np.minimum(np.searchsorted(length, marks), len(x) - 1)]))
    return x[idx], y[idx]


def vand(image_f1: float, pixel_f1: float) -> float:
    """VAND 2023 per-category score: harmonic mean of image and pixel F1-max."""
    if math.isnan(image_f1) or math.isnan(pixel_f1) or image_f1 + pixel_f1 == 0:
        return math.nan
    return 2 * image_f1 * pixel_f1 / (image_f1 + pixel_f1)
