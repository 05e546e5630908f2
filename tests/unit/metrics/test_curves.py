"""Metrics against scikit-learn and an independent brute-force AUPRO; merging; binned bounds."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from pipeline.metrics import curves
from pipeline.metrics.state import BinnedStats, LevelStats, ValueTable


def _sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    return f1.max()


@pytest.mark.parametrize("seed", range(5))
def test_image_level_against_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 12, 300) / 11.0  # few distinct values: many ties
    labels = rng.random(300) < 0.3 + 0.05 * scores
    t = ValueTable.from_scores(scores, labels)
    assert curves.auroc(t) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert curves.average_precision(t) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert curves.f1_max(t) == pytest.approx(_sk_f1max(labels, scores), abs=1e-9)


def _maps(seed, n=4, shape=(12, 15), levels=40):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        mask = np.zeros(shape, bool)
        if i % 3:  # some normal images
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
                mask[r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
        m = rng.integers(0, levels, shape) + 15 * mask * rng.random(shape)
        maps.append(np.floor(m) / (levels + 15))
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed", range(4))
def test_pixel_level_against_sklearn_pooled(seed):
    maps, masks = _maps(seed)
    table = ValueTable().merge(*[ValueTable.from_pixels(m, k) for m, k in zip(maps, masks)])
    y = np.concatenate([k.ravel() for k in masks])
    s = np.concatenate([m.ravel() for m in maps])
    assert curves.auroc(table) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert curves.average_precision(table) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert curves.f1_max(table) == pytest.approx(_sk_f1max(y, s), abs=1e-9)


def _brute_aupro(maps, masks, limit):
    """Threshold loop over every distinct score, scipy 8-connected labelling, explicit interpolation."""
    regions = []
    for k in masks:
        lab, n = ndimage.label(k, structure=np.ones((3, 3)))
        regions += [(len(regions), i, lab) for i in range(1, n + 1)]
    negatives = sum((~k).sum() for k in masks)
    points = [(0.0, 0.0)]
    for t in sorted(set(np.concatenate([m.ravel() for m in maps])), reverse=True):
        fp = sum(((m >= t) & ~k).sum() for m, k in zip(maps, masks))
        recalls = []
        for img, k in enumerate(masks):
            lab, n = ndimage.label(k, structure=np.ones((3, 3)))
            for i in range(1, n + 1):
                region = lab == i
                recalls.append(((maps[img] >= t) & region).sum() / region.sum())
        points.append((fp / negatives, float(np.mean(recalls))))
    area, (px, py) = 0.0, points[0]
    for x, y in points[1:]:
        if x > limit:
            y_lim = py + (y - py) * (limit - px) / (x - px)
            area += (limit - px) * (py + y_lim) / 2
            return area / limit
        area += (x - px) * (py + y) / 2
        px, py = x, y
    return area / limit


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_against_brute_force(seed, limit):
    maps, masks = _maps(seed, n=3, shape=(9, 11), levels=25)
    table = ValueTable().merge(*[ValueTable.from_pixels(m, k) for m, k in zip(maps, masks)])
    assert curves.aupro(table, limit) == pytest.approx(_brute_aupro(maps, masks, limit), abs=1e-9)


def test_regions_touching_at_a_corner_are_one_region():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    mask[3:5, 3:5] = True  # touches the first square only diagonally
    m = np.zeros((6, 6))
    m[1:3, 1:3] = 0.9  # first square fully detected, second not at all
    t = ValueTable.from_pixels(m, mask)
    assert t.n_regions == 1
    # one region of 8 pixels, 4 found at t = 0.9 with no false positive: PRO = 0.5 at FPR 0
    fpr, pro = curves.pro_curve(t)
    assert (fpr[1], pro[1]) == (0.0, 0.5)


def test_merging_partial_states_equals_pooled():
    maps, masks = _maps(7, n=6)
    levels = [np.round(m * 65535).astype(np.int64) for m in maps]
    pooled = LevelStats()
    for lv, k in zip(levels, masks):
        pooled.add(lv, k)
    a, b = LevelStats(), LevelStats()
    for lv, k in zip(levels[:2], masks[:2]):
        a.add(lv, k)
    for lv, k in zip(levels[2:], masks[2:]):
        b.add(lv, k)
    merged = a.merge(b)
    assert np.array_equal(merged.neg, pooled.neg) and np.array_equal(merged.pos, pooled.pos)
    assert merged.n_regions == pooled.n_regions and np.allclose(merged.pro, pooled.pro, atol=1e-12)
    exact = ValueTable().merge(*[ValueTable.from_pixels(lv / 65535, k) for lv, k in zip(levels, masks)])
    dense = merged.table(0.0, 1.0)
    for fn in (curves.auroc, curves.average_precision, curves.f1_max, curves.aupro):
        assert fn(dense) == pytest.approx(fn(exact), abs=1e-9), fn.__name__


def _binned_auroc_bound(table):
    """Upper bound of |AUROC(binned) - AUROC(exact)|: within a bin, positive/negative pairs may be
    ordered either way; each such pair moves the statistic by at most 1/2 of 1/(P N)."""
    p, n = int(table.pos.sum()), int(table.neg.sum())
    return 0.5 * float(np.dot(table.pos.astype(np.float64), table.neg.astype(np.float64))) / (p * n)


def test_binned_mode_within_bound():
    rng = np.random.default_rng(3)
    maps = [rng.random((20, 20)) for _ in range(3)]
    masks = [rng.random((20, 20)) < 0.2 for _ in range(3)]
    exact = ValueTable().merge(*[ValueTable.from_pixels(m, k) for m, k in zip(maps, masks)])
    binned = BinnedStats(0.0, 1.0, bins=65536)
    for m, k in zip(maps, masks):
        binned.add(m, k)
    bt = binned.table()
    bound = _binned_auroc_bound(bt)
    assert abs(curves.auroc(bt) - curves.auroc(exact)) <= bound + 1e-12
    assert curves.f1_max(bt) <= curves.f1_max(exact) + 1e-12
    coarse = BinnedStats(0.0, 1.0, bins=65536)
    coarse.add(np.full((2, 2), 2.0), np.array([[True, False], [False, False]]))  # overflow bin
    assert coarse.pos[-1] == 1 and coarse.neg[-1] == 3


def test_vand_and_degenerate_cases():
    assert curves.vand(0.5, 0.25) == pytest.approx(1 / 3)
    only_neg = ValueTable.from_scores(np.array([0.1, 0.2]), np.array([0, 0]))
    assert np.isnan(curves.auroc(only_neg)) and np.isnan(curves.f1_max(only_neg))


def test_fixed_grid_200_is_labelled_variant_close_to_exact():
    maps, masks = _maps(2, n=5, shape=(30, 30), levels=200)
    table = ValueTable().merge(*[ValueTable.from_pixels(m, k) for m, k in zip(maps, masks)])
    grid = curves.aupro_fixed_grid_200(table)
    assert 0 <= grid <= 1 and grid != curves.aupro(table)


def _aprilgan_pro_port(maps, masks, max_step=200, expect_fpr=0.3):
    """Brute-force port of the APRIL-GAN / AnomalyCLIP AUPRO scheme (test.py ``cal_pro_score``):
    200 linear thresholds, per threshold the mean recall of every 8-connected region and the FPR
    over all normal pixels, keep FPR < 0.3, min-max rescale FPR, then ``sklearn.metrics.auc`` on the
    points IN THRESHOLD ORDER."""
    from sklearn.metrics import auc

    amaps, gts = np.stack(maps), np.stack(masks).astype(bool)
    lo, hi = amaps.min(), amaps.max()
    delta = (hi - lo) / max_step
    pros, fprs = [], []
    for th in np.arange(lo, hi, delta):
        binary = amaps > th
        recalls = []
        for b, m in zip(binary, gts):
            labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
            for r in range(1, n + 1):
                region = labels == r
                recalls.append(b[region].sum() / region.sum())
        fprs.append(np.logical_and(~gts, binary).sum() / (~gts).sum())
        pros.append(np.mean(recalls))
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    fprs = fprs[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros[keep])


def _tied_fpr_maps(seed):
    """Small maps whose anomalous pixels carry values no normal pixel has: between two normal values
    several grid thresholds share one FPR while the PRO changes (ties in FPR, not in PRO)."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(3):
        mask = np.zeros((6, 7), bool)
        if i:
            mask[1 + i : 3 + i, 2:4 + i] = True
        m = rng.integers(0, 10, mask.shape) / 20.0  # normals on 10 coarse levels
        m[mask] = rng.uniform(0.05, 0.7, int(mask.sum()))  # positives everywhere in between
        maps.append(m)
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed", range(8))
def test_fixed_grid_200_integrates_in_threshold_order_like_sklearn_auc(seed):
    maps, masks = _tied_fpr_maps(seed)
    table = ValueTable().merge(*[ValueTable.from_pixels(m, k) for m, k in zip(maps, masks)])
    expected = _aprilgan_pro_port(maps, masks)
    assert np.isfinite(expected)
    assert curves.aupro_fixed_grid_200(table) == pytest.approx(expected, abs=1e-12)


def test_fixed_grid_200_ties_change_the_area_when_sorted_by_fpr():
    """The old implementation sorted the kept points by FPR (np.argsort, unstable): with FPR ties it
    pairs other PRO values with the neighbouring FPRs. Assert that these vectors do tell the two
    apart, so the test above can fail."""
    gaps = []
    for seed in range(8):
        maps, masks = _tied_fpr_maps(seed)
        table = ValueTable().merge(*[ValueTable.from_pixels(m, k) for m, k in zip(maps, masks)])
        lo, hi = float(table.values.min()), float(table.values.max())
        n = table.neg.sum()
        pts = [(table.neg[table.values > th].sum() / n, table.pro[table.values > th].sum() / table.n_regions)
               for th in np.arange(lo, hi, (hi - lo) / 200)]
        f, p = np.array(pts).T
        keep = f < 0.3
        f, p = f[keep], p[keep]
        f = (f - f.min()) / (f.max() - f.min())
        order = np.argsort(f)
        gaps.append(abs(np.trapezoid(p[order], f[order]) - curves.aupro_fixed_grid_200(table)))
    assert max(gaps) > 1e-3


@pytest.mark.parametrize("seed", range(3))
def test_curve_points_against_sklearn(seed):
    from sklearn.metrics import f1_score, roc_curve

    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 15, 120) / 14.0
    labels = rng.random(120) < 0.4
    t = ValueTable.from_scores(scores, labels)
    fpr, tpr = curves.roc_points(t)
    sk_fpr, sk_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)
    recall, precision = curves.pr_points(t)
    sk_p, sk_r, _ = precision_recall_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(recall, sk_r[::-1][1:]) and np.allclose(precision, sk_p[::-1][1:])
    th = curves.f1_max_threshold(t)
    assert f1_score(labels, scores >= th) == pytest.approx(curves.f1_max(t), abs=1e-12)
    assert all(f1_score(labels, scores >= v) <= curves.f1_max(t) + 1e-12 for v in np.unique(scores))


def test_thin_keeps_ends_and_shape():
    x = np.concatenate([np.linspace(0, 0.01, 5000), np.linspace(0.01, 1, 5000)])
    y = np.sqrt(x)
    tx, ty = curves.thin(x, y, 300)
    assert len(tx) <= 302 and tx[0] == 0 and tx[-1] == 1 and np.all(np.diff(tx) >= 0)
    assert np.max(np.abs(np.interp(x, tx, ty) - y)) < 0.02  # the steep start is kept
    assert curves.thin(x[:10], y[:10], 300)[0].shape == (10,)
