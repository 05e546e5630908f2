"""pipeline.ops.aggregate: tile maps and scores back to image level (values worked out by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ops.aggregate import AggregateResult, aggregate_tiles, top_k
from pipeline.ops.tiling import Tile


def T(cid, box):
    return Tile(component_id=cid, box=box, reason="component")


def test_two_overlapping_tiles_average_on_the_overlap():
    # 6 x 8 image; A covers rows 0..3, cols 0..3; B covers rows 1..4, cols 2..5
    tiles = [T(0, (0, 0, 4, 4)), T(1, (2, 1, 6, 5))]
    maps = [np.full((4, 4), 0.8), np.full((4, 4), 1.0)]
    result = aggregate_tiles((6, 8), tiles, np.array([0.5, 0.2]), maps)
    a, b = 0.8 * 0.5, 1.0 * 0.2  # 0.4 and 0.2
    expected = np.zeros((6, 8), np.float32)
    expected[0:4, 0:4] = a
    expected[1:5, 2:6] = b
    expected[1:4, 2:4] = (a + b) / 2  # overlap: mean of the covering tiles = 0.3
    assert isinstance(result, AggregateResult)
    assert result.image_map.dtype == np.float32 and result.image_map.shape == (6, 8)
    np.testing.assert_allclose(result.image_map, expected, rtol=1e-6)
    assert result.image_map[0, 0] == pytest.approx(0.4)  # only A
    assert result.image_map[4, 5] == pytest.approx(0.2)  # only B
    assert result.image_map[2, 3] == pytest.approx(0.3)  # both
    assert result.image_map[5, 7] == 0.0 and result.image_map[0, 6] == 0.0  # no tile
    assert result.component_scores == {0: 0.5, 1: 0.2}
    # 2 components: top ceil(0.25 * 2) = 1 -> the best one
    assert result.image_score == pytest.approx(0.5)


def test_maps_are_pasted_row_major_not_transposed():
    # a 2 x 3 (rows x cols) tile at x = 1..3, y = 2..3 of a 5 x 5 image
    tile_map = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    result = aggregate_tiles((5, 5), [T(0, (1, 2, 4, 4))], np.array([2.0]), [tile_map])
    expected = np.zeros((5, 5))
    expected[2, 1:4] = [2.0, 4.0, 6.0]
    expected[3, 1:4] = [8.0, 10.0, 12.0]
    np.testing.assert_allclose(result.image_map, expected)


def test_three_tiles_overlap_mean_and_component_mean():
    tiles = [T(0, (0, 0, 2, 2)), T(0, (1, 0, 3, 2)), T(1, (1, 1, 3, 3))]
    maps = [np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2))]
    result = aggregate_tiles((3, 3), tiles, np.array([0.3, 0.6, 0.9]), maps)
    # pixel (row 1, col 1) is covered by all three: (0.3 + 0.6 + 0.9) / 3 = 0.6
    assert result.image_map[1, 1] == pytest.approx(0.6)
    assert result.image_map[0, 1] == pytest.approx(0.45)  # tiles 0 and 1
    assert result.image_map[2, 2] == pytest.approx(0.9)  # tile 2 only
    assert result.image_map[2, 0] == 0.0
    assert result.component_scores == {0: pytest.approx(0.45), 1: pytest.approx(0.9)}


def test_resizing_a_2x2_map_into_a_4x4_box_is_bilinear_with_aligned_centres():
    # output index i samples source coordinate (i + 0.5) * 2 / 4 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped to [0, 1] -> weights of the second source row/col: 0, 0.25, 0.75, 1
    tile_map = np.array([[0.0, 1.0], [2.0, 3.0]])  # value = 2 * row + col
    wgt = np.array([0.0, 0.25, 0.75, 1.0])
    expected_tile = 2.0 * wgt[:, None] + wgt[None, :]
    result = aggregate_tiles((6, 6), [T(0, (1, 2, 5, 6))], np.array([0.5]), [tile_map])
    expected = np.zeros((6, 6))
    expected[2:6, 1:5] = 0.5 * expected_tile
    np.testing.assert_allclose(result.image_map, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([0.7], 0.7),  # 1 component: ceil(0.25) = 1
        ([0.1, 0.9, 0.3, 0.5], 0.9),  # 4: ceil(1.0) = 1
        ([0.1, 0.9, 0.3, 0.5, 0.8], (0.9 + 0.8) / 2),  # 5: ceil(1.25) = 2
        ([0.2, 0.1, 0.6, 0.4, 0.95, 0.3, 0.5, 0.0], (0.95 + 0.6) / 2),  # 8: ceil(2.0) = 2
    ],
)
def test_image_score_is_the_mean_of_the_top_quarter(scores, expected):
    tiles = [T(cid, (cid, 0, cid + 1, 1)) for cid in range(len(scores))]
    result = aggregate_tiles((1, 8), tiles, np.array(scores), None)
    assert result.image_map is None
    assert result.component_scores == {cid: pytest.approx(s) for cid, s in enumerate(scores)}
    assert result.image_score == pytest.approx(expected)


def test_top_fraction_and_component_grouping():
    # component 4 has two tiles (0.2, 1.0 -> 0.6); component 1 one tile (0.7); component 9 (0.1)
    tiles = [T(4, (0, 0, 1, 1)), T(1, (1, 0, 2, 1)), T(4, (2, 0, 3, 1)), T(9, (3, 0, 4, 1))]
    scores = np.array([0.2, 0.7, 1.0, 0.1])
    result = aggregate_tiles((1, 4), tiles, scores)
    assert list(result.component_scores) == [1, 4, 9]
    assert result.component_scores[4] == pytest.approx(0.6)
    assert result.image_score == pytest.approx(0.7)  # top ceil(0.75) = 1
    assert aggregate_tiles((1, 4), tiles, scores, top_fraction=0.5).image_score == pytest.approx(0.65)
    assert aggregate_tiles((1, 4), tiles, scores, top_fraction=1.0).image_score == pytest.approx(1.4 / 3)


def test_top_k_rounds_up_without_float_noise():
    assert [top_k(n, 0.25) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert top_k(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert top_k(0, 0.25) == 1


def test_whole_image_tile():
    tiles = [Tile(component_id=-1, box=(0, 0, 5, 3), reason="whole_image")]
    result = aggregate_tiles((3, 5), tiles, np.array([0.4]), [np.ones((6, 10))])
    np.testing.assert_allclose(result.image_map, np.full((3, 5), 0.4), rtol=1e-6)
    assert result.component_scores == {-1: pytest.approx(0.4)}
    assert result.image_score == pytest.approx(0.4)


@pytest.mark.parametrize(
    "hw, tiles, scores, maps, kwargs, match",
    [
        ((4, 4), [T(0, (0, 0, 2, 2))], [0.1, 0.2], None, {}, "tile_scores"),
        ((4, 4), [T(0, (0, 0, 2, 2))], [np.nan], None, {}, "tile_scores"),
        ((4, 4), [T(0, (0, 0, 2, 2))], [np.inf], None, {}, "tile_scores"),
        ((4, 4), [T(0, (0, 0, 2, 2))], ["a"], None, {}, "tile_scores"),
        ((4, 4), [T(0, (0, 0, 2, 2))], [0.1], [np.ones((2, 2))] * 2, {}, "tile_maps"),
        ((4, 4), [T(0, (0, 0, 2, 2))], [0.1], [np.full((2, 2), np.nan)], {}, r"tile_maps\[0\]"),
        ((4, 4), [T(0, (0, 0, 2, 2))], [0.1], [np.ones(4)], {}, r"tile_maps\[0\]"),
        ((4, 4), [T(0, (0, 0, 2, 2))], [0.1], None, {"top_fraction": 0.0}, "top_fraction"),
        ((4, 4), [T(0, (0, 0, 2, 2))], [0.1], None, {"top_fraction": 1.5}, "top_fraction"),
        ((4, 4), [T(0, (0, 0, 2, 2))], [0.1], None, {"top_fraction": float("nan")}, "top_fraction"),
        ((4, 4), [T(0, (0, 0, 5, 2))], [0.1], None, {}, r"tiles\[0\]"),
        ((4, 4), [T(0, (0, 0, 2, 2)), T(1, (2, 2, 2, 3))], [0.1, 0.2], None, {}, r"tiles\[1\]"),
        ((4, 4), [], [], None, {}, "tiles"),
        ((0, 4), [T(0, (0, 0, 2, 2))], [0.1], None, {}, "image_hw"),
        ((4.5, 4), [T(0, (0, 0, 2, 2))], [0.1], None, {}, "image_hw"),
    ],
)
def test_invalid_arguments(hw, tiles, scores, maps, kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggregate_tiles(hw, tiles, np.array(scores), maps, **kwargs)
