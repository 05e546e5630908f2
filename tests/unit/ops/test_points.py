"""pipeline.ops.points: SAM prompt points from a CLIP anomaly map (METHODS.md section 6), checked on
hand-built maps with known answers and against brute-force references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.ops import points as P
from pipeline.ops.points import (
    bounding_box,
    ellipse_kernel,
    extreme_region,
    negative_points,
    pooled_feature,
    positive_points,
    ring,
    spaced_top_k,
)

# ------------------------------------------------------------------------------------------------
# references written independently of the module


def _ref_spaced(scores, cand, k, min_distance, squared=False):
    """O(N * k) pure-Python greedy: sort by (-score, row, col), keep a pixel when far enough."""
    order = sorted((-float(scores[r, c]), int(r), int(c)) for r, c in zip(*np.nonzero(cand)))
    chosen = []
    for _, r, c in order:
        if len(chosen) == k:
            break
        if squared:
            ok = all((c - x) ** 2 + (r - y) ** 2 >= min_distance for x, y in chosen)
        else:
            ok = all(math.hypot(c - x, r - y) >= min_distance for x, y in chosen)
        if ok:
            chosen.append((c, r))
    return np.array(chosen, dtype=np.int64).reshape(-1, 2)


def _ellipse_from_half_widths(half_widths):
    k = len(half_widths)
    c = k // 2
    out = np.zeros((k, k), bool)
    for i, hw in enumerate(half_widths):
        out[i, c - hw : c + hw + 1] = True
    return out


def _ref_dilate(region, structure):
    """Dilation by explicit offsets: every region pixel stamps the (centred) element, clipped."""
    h, w = region.shape
    k = structure.shape[0]
    c = k // 2
    out = np.zeros_like(region)
    for r, col in zip(*np.nonzero(region)):
        for i, j in zip(*np.nonzero(structure)):
            rr, cc = r + i - c, col + j - c
            if 0 <= rr < h and 0 <= cc < w:
                out[rr, cc] = True
    return out


# Hand-derived OpenCV MORPH_ELLIPSE shapes (r = k // 2, row half-width = round(sqrt(r^2 - dy^2))).
# 3x3: r=1 -> dy=+-1: 0; dy=0: 1  => a cross.
ELLIPSE_3 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
# 5x5: r=2 -> dy=+-2: 0; dy=+-1: round(sqrt 3 = 1.73) = 2; dy=0: 2.
ELLIPSE_5 = np.array(
    [
        [0, 0, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 1, 0, 0],
    ],
    bool,
)
# 7x7: r=3 -> dy=+-3: 0; dy=+-2: round(sqrt 5 = 2.24) = 2; dy=+-1: round(sqrt 8 = 2.83) = 3; dy=0: 3.
ELLIPSE_7 = np.array(
    [
        [0, 0, 0, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 0, 0, 0],
    ],
    bool,
)
# 25x25: r=12, |dy| = 12..0 -> sqrt(0, 23, 44, 63, 80, 95, 108, 119, 128, 135, 140, 143, 144)
#   = 0, 4.80, 6.63, 7.94, 8.94, 9.75, 10.39, 10.91, 11.31, 11.62, 11.83, 11.96, 12 -> rounded:
HALF_25_TOP = [0, 5, 7, 8, 9, 10, 10, 11, 11, 12, 12, 12, 12]
ELLIPSE_25 = _ellipse_from_half_widths(HALF_25_TOP + HALF_25_TOP[-2::-1])


# ------------------------------------------------------------------------------------------------
# elliptical kernel


@pytest.mark.parametrize("k,expected", [(3, ELLIPSE_3), (5, ELLIPSE_5), (7, ELLIPSE_7), (25, ELLIPSE_25)])
def test_ellipse_kernel_matches_hand_derived_opencv_shapes(k, expected):
    got = ellipse_kernel(k)
    assert got.dtype == bool and got.shape == (k, k)
    assert np.array_equal(got, expected)


def test_ellipse_25_sanity():
    e = ellipse_kernel(25)
    assert np.array_equal(e, e[::-1]) and np.array_equal(e, e[:, ::-1])
    # built row by row, OpenCV's ellipse is NOT transpose-symmetric (5x5: row 0 has 1 pixel, column 0 has 3)
    assert not np.array_equal(e, e.T) and not np.array_equal(ellipse_kernel(5), ellipse_kernel(5).T)
    assert e.sum() == sum(2 * h + 1 for h in HALF_25_TOP) * 2 - (2 * 12 + 1)  # 481 pixels
    assert e[0].sum() == 1 and e[12].all() and e[1].sum() == 11


@pytest.mark.parametrize("bad", [2, 4, 24, 1, 0, -3, 3.0, True, "25"])
def test_ellipse_kernel_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="kernel"):
        ellipse_kernel(bad)


# ------------------------------------------------------------------------------------------------
# extreme region


def test_region_absolute():
    m = np.arange(16, dtype=float).reshape(4, 4) / 15.0
    assert np.array_equal(extreme_region(m, "absolute", 0.5), m >= 0.5)
    # equality counts as inside
    m2 = np.array([[0.0, 0.3], [0.7, 1.0]])
    assert np.array_equal(extreme_region(m2, "absolute", 0.7), np.array([[0, 0], [1, 1]], bool))


def test_region_fraction():
    m = np.array([[0.0, 2.0, 7.9], [8.0, 9.0, 10.0]])
    assert np.array_equal(extreme_region(m, "fraction", 0.8), np.array([[0, 0, 0], [1, 1, 1]], bool))
    assert np.array_equal(extreme_region(m, "fraction", 1.0), m == 10.0)
    # a fraction of the MAXIMUM, not of the range: min 5, max 10, 0.8 -> >= 8 (of the range it would be >= 9)
    m2 = np.array([[5.0, 6.0], [8.0, 10.0]])
    assert np.array_equal(extreme_region(m2, "fraction", 0.8), np.array([[0, 0], [1, 1]], bool))


def test_region_quantile():
    m = np.arange(10, dtype=float).reshape(2, 5)
    # np.quantile(0..9, 0.5) = 4.5 -> pixels 5..9
    assert np.array_equal(extreme_region(m, "quantile", 0.5), m >= 5)
    assert np.array_equal(extreme_region(m, "quantile", 1.0), m == 9)
    assert extreme_region(m, "quantile", 0.0).all()


def test_region_default_mode_is_fraction():
    m = np.array([[0.0, 0.5], [0.85, 1.0]])
    assert P.DEFAULT_REGION_MODE == "fraction"
    assert np.array_equal(extreme_region(m), m >= P.DEFAULT_REGION_VALUE * 1.0)


@pytest.mark.parametrize(
    "m,mode,value,match",
    [
        (np.array([[0.0, np.nan], [1.0, 0.5]]), "absolute", 0.5, "NaN"),
        (np.array([[0.0, np.inf], [1.0, 0.5]]), "absolute", 0.5, "NaN/inf"),
        (np.full((3, 3), 0.4), "absolute", 0.1, "constant"),
        (np.zeros((0, 3)), "absolute", 0.1, "empty"),
        (np.zeros(5), "absolute", 0.1, "2-D"),
        (np.array([[0.0, 1.0]]), "top", 0.5, "mode"),
        (np.array([[0.0, 1.0]]), "quantile", 1.5, "value"),
        (np.array([[0.0, 1.0]]), "fraction", -0.1, "value"),
        (np.array([[0.0, 1.0]]), "absolute", float("nan"), "value"),
        (np.array([[-2.0, -1.0]]), "fraction", 0.5, "positive"),
    ],
)
def test_region_errors(m, mode, value, match):
    with pytest.raises(ValueError, match=match):
        extreme_region(m, mode, value)


# ------------------------------------------------------------------------------------------------
# spaced top-k


def test_two_separated_peaks():
    s = np.zeros((20, 20))
    s[3, 4] = 1.0
    s[15, 16] = 0.9
    got = spaced_top_k(s, np.ones_like(s, bool), 2, 5.0)
    assert got.dtype == np.int64
    assert got.tolist() == [[4, 3], [16, 15]]  # (x, y) = (col, row), best first


def test_spacing_suppresses_neighbour():
    s = np.zeros((10, 20))
    s[5, 5], s[5, 6], s[5, 12] = 1.0, 0.95, 0.5
    cand = np.ones_like(s, bool)
    assert spaced_top_k(s, cand, 2, 3.0).tolist() == [[5, 5], [12, 5]]
    assert spaced_top_k(s, cand, 2, 0.0).tolist() == [[5, 5], [6, 5]]


def test_plateau_ties_are_row_major():
    s = np.ones((3, 4))
    cand = np.ones_like(s, bool)
    assert spaced_top_k(s, cand, 3, 0.0).tolist() == [[0, 0], [1, 0], [2, 0]]
    # spacing 2: (0,0) taken; (0,1) too close; (0,2) at distance 2 kept; row 1 all within 2 of a
    # chosen point (1 or sqrt 2); (2,0) at distance 2 from (0,0) kept
    assert spaced_top_k(s, cand, 3, 2.0).tolist() == [[0, 0], [2, 0], [0, 2]]


def test_squared_versus_plain_distance():
    s = np.array([[1.0, 0.0, 0.0, 0.9, 0.0, 0.8]])
    cand = np.ones_like(s, bool)
    # squared: d^2 = 9 >= 9 kept (equality is not "closer than")
    assert spaced_top_k(s, cand, 2, 9.0, squared=True).tolist() == [[0, 0], [3, 0]]
    # plain 9 px: both other peaks (3 and 5 px away) and everything else are too close
    assert spaced_top_k(s, cand, 2, 9.0).tolist() == [[0, 0]]
    # squared 10: 9 < 10 suppresses x=3; 25 >= 10 keeps x=5
    assert spaced_top_k(s, cand, 2, 10.0, squared=True).tolist() == [[0, 0], [5, 0]]
    # plain 3 px = squared 9
    assert spaced_top_k(s, cand, 2, 3.0).tolist() == [[0, 0], [3, 0]]


def test_only_candidates_are_chosen_and_nan_outside_is_ignored():
    s = np.array([[9.0, np.nan, 1.0], [2.0, 3.0, 0.5]])
    cand = np.array([[0, 0, 1], [1, 1, 1]], bool)
    assert spaced_top_k(s, cand, 10, 0.0).tolist() == [[1, 1], [0, 1], [2, 0], [2, 1]]


@pytest.mark.parametrize("seed", range(6))
def test_spaced_top_k_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 30, size=2)
    s = rng.integers(0, 4, size=(h, w)).astype(float)  # coarse levels: plenty of ties
    cand = rng.random((h, w)) < 0.6
    for k in (1, 3, 7):
        for md in (0.0, 2.0, 3.0, 6.0):
            for squared in (False, True):
                got = spaced_top_k(s, cand, k, md, squared)
                assert np.array_equal(got, _ref_spaced(s, cand, k, md, squared)), (k, md, squared)


@pytest.mark.parametrize("block", [1, 2, 3, 7])
def test_spaced_top_k_small_blocks_match_brute_force(monkeypatch, block):
    # tiny internal blocks: points chosen in earlier blocks must suppress later candidates with the
    # same rule (equality kept) as points chosen within a block
    monkeypatch.setattr(P, "_BLOCK", block)
    rng = np.random.default_rng(block)
    s = rng.integers(0, 3, size=(9, 11)).astype(float)
    cand = rng.random((9, 11)) < 0.8
    for k, md, squared in [(6, 2.0, False), (6, 3.0, False), (8, 4.0, True), (5, 9.0, True), (4, 0.0, False)]:
        got = spaced_top_k(s, cand, k, md, squared)
        assert np.array_equal(got, _ref_spaced(s, cand, k, md, squared)), (k, md, squared)


def test_spaced_top_k_across_blocks():
    # more candidates than one internal block, spacing forcing the scan through all of them
    s = np.ones((80, 80))
    s[70:, 70:] = 2.0
    cand = np.ones_like(s, bool)
    got = spaced_top_k(s, cand, 12, 25.0)
    assert np.array_equal(got, _ref_spaced(s, cand, 12, 25.0))
    assert got[0].tolist() == [70, 70]


def test_spaced_top_k_edge_cases_and_errors():
    s = np.arange(6, dtype=float).reshape(2, 3)
    cand = np.ones_like(s, bool)
    assert spaced_top_k(s, cand, 0, 1.0).shape == (0, 2)
    assert spaced_top_k(s, np.zeros_like(cand), 3, 1.0).shape == (0, 2)
    with pytest.raises(ValueError, match="candidates"):
        spaced_top_k(s, np.ones((3, 2), bool), 1, 1.0)
    with pytest.raises(ValueError, match="min_distance"):
        spaced_top_k(s, cand, 1, -1.0)
    with pytest.raises(ValueError, match="k"):
        spaced_top_k(s, cand, -1, 1.0)
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        spaced_top_k(bad, cand, 1, 1.0)


# ------------------------------------------------------------------------------------------------
# positive points


def test_positive_points_two_peaks_in_region():
    m = np.zeros((30, 30))
    m[5, 5] = 1.0
    m[5, 6] = 0.99
    m[20, 25] = 0.95
    m[29, 0] = 0.2
    region = extreme_region(m, "fraction", 0.9)
    assert region.sum() == 3
    assert positive_points(m, region, k=5, min_distance=3.0).tolist() == [[5, 5], [25, 20]]
    assert positive_points(m, region, k=5, min_distance=0.0).tolist() == [[5, 5], [6, 5], [25, 20]]


def test_positive_points_empty_and_single_pixel_region():
    m = np.linspace(0, 1, 20).reshape(4, 5)
    region = extreme_region(m, "absolute", 2.0)
    assert not region.any()
    got = positive_points(m, region)
    assert got.shape == (0, 2) and got.dtype == np.int64
    single = extreme_region(m, "fraction", 1.0)
    assert single.sum() == 1
    assert positive_points(m, single).tolist() == [[4, 3]]


def test_positive_points_default_spacing():
    assert P.DEFAULT_POSITIVE_K == 5 and P.DEFAULT_MIN_DISTANCE == 20.0 and P.DEFAULT_SQUARED is False
    m = np.zeros((5, 60))
    m[2, :] = np.linspace(1.0, 0.5, 60)  # decreasing along x: greedy picks x = 0, 20, 40
    region = m > 0
    assert positive_points(m, region).tolist() == [[0, 2], [20, 2], [40, 2]]


def test_positive_points_shape_mismatch():
    with pytest.raises(ValueError, match="region"):
        positive_points(np.zeros((3, 3)), np.ones((3, 4), bool))


# ------------------------------------------------------------------------------------------------
# ring


@pytest.mark.parametrize("kernel,element", [(5, ELLIPSE_5), (7, ELLIPSE_7), (25, ELLIPSE_25)])
def test_ring_of_square_matches_brute_force(kernel, element):
    region = np.zeros((40, 44), bool)
    region[15:22, 18:26] = True
    got = ring(region, kernel)
    expected = _ref_dilate(region, element) & ~region
    assert np.array_equal(got, expected)
    assert not (got & region).any()


def test_ring_of_single_pixel_is_kernel_minus_centre():
    region = np.zeros((11, 11), bool)
    region[5, 5] = True
    expected = np.zeros_like(region)
    expected[2:9, 2:9] = ELLIPSE_7
    expected[5, 5] = False
    assert np.array_equal(ring(region, 7), expected)


def test_ring_clipped_at_border():
    region = np.zeros((12, 9), bool)
    region[0:2, 0:3] = True  # touches the top-left corner
    got = ring(region, 25)
    assert np.array_equal(got, _ref_dilate(region, ELLIPSE_25) & ~region)
    assert got.shape == region.shape


def test_ring_empty_region_and_bad_kernel():
    assert not ring(np.zeros((5, 5), bool)).any()
    with pytest.raises(ValueError, match="odd"):
        ring(np.ones((5, 5), bool), 4)
    with pytest.raises(ValueError, match="region"):
        ring(np.ones((5, 5, 2), bool))


# ------------------------------------------------------------------------------------------------
# SAM feature lookup


def _coded_features(c, g):
    """features[ch, row, col] = 100 ch + 10 row + col."""
    ch, row, col = np.meshgrid(np.arange(c), np.arange(g), np.arange(g), indexing="ij")
    return (100 * ch + 10 * row + col).astype(np.float32)


def _ref_feature_at(features, xy, input_size, original_size):
    """Per-pixel lookup, written from the mapping's definition: pixel (x, y) -> embedding column
    floor((x + .5) * w / W / 16), row floor((y + .5) * h / H / 16), clipped to the grid."""
    (h, w), (H, W), g = input_size, original_size, features.shape[1]
    out = []
    for x, y in xy:
        col = min(math.floor((x + 0.5) * w / W / 16), g - 1)
        row = min(math.floor((y + 0.5) * h / H / 16), g - 1)
        out.append(features[:, row, col])
    return np.array(out)


def test_pooled_feature_of_one_pixel_non_square_image():
    # original 60 x 100 (H x W), g = 4 -> 64 px square; resized (h, w) = (round(60 * 0.64), 64) = (38, 64)
    feats = _coded_features(2, 4)
    xy = np.array([[0, 0], [24, 24], [25, 25], [99, 50], [50, 51], [99, 59]])
    # col = floor((x + .5) * 64 / 100 / 16) = floor((x + .5) * .04): x=0,24 -> 0 (0.98); 25 -> 1 (1.02);
    #   50 -> 2 (2.02); 99 -> 3 (3.98)
    # row = floor((y + .5) * 38 / 60 / 16): y=0,24 -> 0 (0.97); 25 -> 1 (1.009); 50 -> 1 (1.9989);
    #   51 -> 2 (2.0385); 59 -> 2 (2.355): the last embedding row (padding) is never reached
    cells = [(0, 0), (0, 0), (1, 1), (1, 3), (2, 2), (2, 3)]
    expected = np.array([[10 * r + c, 100 + 10 * r + c] for r, c in cells], dtype=np.float32)
    assert np.array_equal(_ref_feature_at(feats, xy, (38, 64), (60, 100)), expected)
    for (x, y), want in zip(xy, expected):
        region = np.zeros((60, 100), bool)
        region[y, x] = True
        assert np.array_equal(pooled_feature(feats, region, (38, 64), (60, 100)), want)


def test_pooled_feature_size_errors():
    feats = _coded_features(2, 4)
    region = np.ones((60, 100), bool)
    with pytest.raises(ValueError, match="input_size"):
        pooled_feature(feats, region, (38, 65), (60, 100))
    with pytest.raises(ValueError, match="features"):
        pooled_feature(np.zeros((2, 4, 5)), region, (38, 64), (60, 100))


def test_pooled_feature_matches_per_pixel_mean():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(3, 4, 4))
    region = rng.random((30, 50)) < 0.3
    ys, xs = np.nonzero(region)
    expected = _ref_feature_at(feats, np.stack([xs, ys], axis=1), (38, 64), (30, 50)).mean(axis=0)
    got = pooled_feature(feats, region, (38, 64), (30, 50))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_pooled_feature_hand_example_and_errors():
    feats = _coded_features(1, 4)
    region = np.zeros((64, 64), bool)
    region[0:16, 0:16] = True  # 256 pixels in cell (0, 0) -> 0
    region[16, 16] = True  # 1 pixel in cell (1, 1) -> 11
    assert np.allclose(pooled_feature(feats, region, (64, 64), (64, 64)), [11 / 257])
    with pytest.raises(ValueError, match="empty"):
        pooled_feature(feats, np.zeros((64, 64), bool), (64, 64), (64, 64))
    with pytest.raises(ValueError, match="region"):
        pooled_feature(feats, np.zeros((64, 63), bool), (64, 64), (64, 64))


# ------------------------------------------------------------------------------------------------
# negative points


def _quadrant_scene():
    """64 x 64 image, g = 4 (16 px cells). Region in cell (1, 1); features (1, 0) everywhere except
    cells (2..3, 2..3) = (-1, 0) (opposite: cosine -1) and cells (2..3, 0..1) = (0, 3) (orthogonal: 0)."""
    feats = np.zeros((2, 4, 4))
    feats[0] = 1.0
    feats[:, 2:, 2:] = np.array([-1.0, 0.0])[:, None, None]
    feats[:, 2:, :2] = np.array([0.0, 3.0])[:, None, None]
    region = np.zeros((64, 64), bool)
    region[20:28, 20:28] = True
    return feats, region


def _ref_negative(feats, region, ring_mask, k, md):
    g = feats.shape[1]
    ys, xs = np.nonzero(region)
    f_a = np.mean([feats[:, y // 16, x // 16] for y, x in zip(ys, xs)], axis=0)
    sim = np.zeros(ring_mask.shape)
    for y, x in zip(*np.nonzero(ring_mask)):
        f = feats[:, min(y // 16, g - 1), min(x // 16, g - 1)]
        sim[y, x] = f @ f_a / (np.linalg.norm(f) * np.linalg.norm(f_a))
    return _ref_spaced(-sim, ring_mask, k, md)


def test_negative_points_pick_opposite_quadrant():
    feats, region = _quadrant_scene()
    n = ring(region, 25)
    # the ring reaches 12 px beyond the square: rows/cols 8..39, so it enters cells of row/col 2
    assert n[32:40, 32:40].any() and n[32:40, 8:16].any()
    got = negative_points(feats, region, n, (64, 64), (64, 64), k=3, min_distance=0.0)
    # all -1 pixels tie: row-major order -> the first ring row inside the opposite quadrant
    first = np.argwhere(n[32:, 32:])[0] + 32  # (row, col)
    assert got.tolist() == [[first[1], first[0]], [first[1] + 1, first[0]], [first[1] + 2, first[0]]]
    for x, y in got:
        assert y >= 32 and x >= 32 and n[y, x]


def test_negative_points_match_brute_force():
    feats, region = _quadrant_scene()
    n = ring(region, 25)
    for k, md in [(1, 0.0), (5, 4.0), (12, 6.0), (40, 5.0)]:
        got = negative_points(feats, region, n, (64, 64), (64, 64), k=k, min_distance=md)
        assert np.array_equal(got, _ref_negative(feats, region, n, k, md)), (k, md)
    # with many points the opposite quadrant (cosine -1) is used up before the orthogonal one (0)
    got = negative_points(feats, region, n, (64, 64), (64, 64), k=40, min_distance=5.0)
    in_opposite = (got[:, 0] >= 32) & (got[:, 1] >= 32)
    assert in_opposite.any() and not in_opposite[np.argmin(in_opposite):].any()


def test_negative_points_empty_ring_and_errors():
    feats, region = _quadrant_scene()
    got = negative_points(feats, region, np.zeros_like(region), (64, 64), (64, 64))
    assert got.shape == (0, 2) and got.dtype == np.int64
    with pytest.raises(ValueError, match="empty"):
        negative_points(feats, np.zeros_like(region), ring(region), (64, 64), (64, 64))
    with pytest.raises(ValueError, match="ring_mask"):
        negative_points(feats, region, np.ones((64, 60), bool), (64, 64), (64, 64))


# ------------------------------------------------------------------------------------------------
# box


def test_bounding_box():
    m = np.zeros((8, 10), bool)
    m[2, 3] = m[5, 7] = m[4, 4] = True
    box = bounding_box(m)
    assert box.dtype == np.float64 and box.tolist() == [3.0, 2.0, 7.0, 5.0]
    single = np.zeros((8, 10), bool)
    single[6, 9] = True
    assert bounding_box(single).tolist() == [9.0, 6.0, 9.0, 6.0]
    assert bounding_box(np.zeros((4, 4), bool)) is None
    with pytest.raises(ValueError, match="mask"):
        bounding_box(np.zeros((4, 4, 2), bool))
