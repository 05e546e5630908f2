"""pipeline.ops.tiling: the pure tiling plan (square tiles per component, elongated rule, clipping)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ops.foreground import Component
from pipeline.ops.tiling import REASONS, Tile, plan_tiles


def C(cid, box, n_parts=1):
    x0, y0, x1, y1 = box
    return Component(id=cid, box=box, area=(x1 - x0) * (y1 - y0), n_parts=n_parts)


def _side(tile):
    x0, y0, x1, y1 = tile.box
    assert x1 - x0 == y1 - y0, f"tile {tile} is not square"
    return x1 - x0


def _inside_image(tile, h, w):
    x0, y0, x1, y1 = tile.box
    return 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def _contains(tile, x, y):
    x0, y0, x1, y1 = tile.box
    return x0 <= x <= x1 and y0 <= y <= y1


def test_single_component_tile_is_centred_with_min_side():
    # centre (420, 320); side 352 -> corner (420 - 176, 320 - 176)
    tiles = plan_tiles([C(0, (400, 300, 440, 340))], (800, 1000))
    assert tiles == [Tile(component_id=0, box=(244, 144, 596, 496), reason="component")]


def test_large_component_tile_side_is_its_long_side():
    # box 500 x 200, centre (350, 250.5): side 500, corner floor(350 - 250) = 100, floor(250.5 - 250) = 0
    tiles = plan_tiles([C(3, (100, 150, 600, 351))], (800, 1000))
    assert tiles == [Tile(component_id=3, box=(100, 0, 600, 500), reason="component")]


def test_half_pixel_centre_uses_floor():
    # box (0, 0, 5, 5) -> centre (2.5, 2.5); side 4: corner floor(0.5) = 0 -> tile (0, 0, 4, 4)
    # box (11, 11, 16, 16) -> centre (13.5, 13.5): corner floor(11.5) = 11
    tiles = plan_tiles([C(0, (0, 0, 5, 5)), C(1, (11, 11, 16, 16))], (30, 30), min_tile=4)
    assert [t.box for t in tiles] == [(0, 0, 5, 5), (11, 11, 16, 16)]  # side 5 = long side
    tiles = plan_tiles([C(0, (11, 11, 15, 14))], (30, 30), min_tile=6)
    # centre (13, 12.5), side 6 -> corner (10, floor(9.5) = 9)
    assert tiles[0].box == (10, 9, 16, 15)


def test_components_at_image_corners_are_shifted_inside():
    h, w = 500, 600
    comps = [C(0, (0, 0, 10, 10)), C(1, (590, 490, 600, 500)), C(2, (0, 480, 30, 500)), C(3, (580, 0, 600, 15))]
    tiles = plan_tiles(comps, (h, w))
    assert [t.box for t in tiles] == [(0, 0, 352, 352), (248, 148, 600, 500), (0, 148, 352, 500), (248, 0, 600, 352)]
    for tile, comp in zip(tiles, comps):
        assert _inside_image(tile, h, w) and _side(tile) == 352 and tile.reason == "component"
        x0, y0, x1, y1 = comp.box
        assert _contains(tile, (x0 + x1) / 2, (y0 + y1) / 2)


def test_elongated_many_part_component_tiles_step_half_the_short_side():
    # 800 x 40 box, 25 parts: short side 40 -> step 20, side max(352, 40) = 352; centres x = 200, 220, ..., 1000
    box = (200, 280, 1000, 320)
    tiles = plan_tiles([C(7, box, n_parts=25)], (600, 2000))
    assert len(tiles) == 41  # 800 / 20 + 1 (both ends)
    assert all(t.reason == "elongated" and t.component_id == 7 and _side(t) == 352 for t in tiles)
    centres_x = [(t.box[0] + t.box[2]) / 2 for t in tiles]
    centres_y = [(t.box[1] + t.box[3]) / 2 for t in tiles]
    assert centres_x[0] == 200 and centres_x[-1] == 1000
    assert np.all(np.diff(centres_x) == 20)
    assert set(centres_y) == {300}
    assert tiles[0].box == (24, 124, 376, 476)


def test_elongated_odd_short_side_and_vertical_axis():
    # vertical box 35 wide x 800 tall: step 17.5; ideal centres y = 300 + 17.5 k (k = 0..45: up to
    # 1087.5), then the far end 1100; no tile needs shifting in a 1400-tall image
    box = (500, 300, 535, 1100)
    tiles = plan_tiles([C(0, box, n_parts=21)], (1400, 1100))
    ideal = [300 + 17.5 * k for k in range(46)] + [1100.0]
    assert len(tiles) == len(ideal)
    for tile, cy in zip(tiles, ideal):
        assert _side(tile) == 352
        assert tile.box[1] == int(np.floor(cy - 176))  # corner = floor(centre - side / 2)
        assert tile.box[0] == int(np.floor(517.5 - 176))
        assert abs((tile.box[1] + tile.box[3]) / 2 - cy) <= 0.5


def test_elongated_end_tiles_are_shifted_and_duplicates_dropped():
    # a bar spanning the full width: the end tiles are shifted inside, identical boxes emitted once
    h, w = 400, 1000
    tiles = plan_tiles([C(0, (0, 180, 1000, 220), n_parts=30)], (h, w))
    boxes = [t.box for t in tiles]
    assert len(set(boxes)) == len(boxes)
    assert boxes[0] == (0, 24, 352, 376) and boxes[-1] == (648, 24, 1000, 376)
    assert all(_inside_image(t, h, w) for t in tiles)
    xs = [b[0] for b in boxes]
    assert xs == sorted(xs)
    assert np.all(np.diff(xs) <= 20)  # no gap: consecutive tiles overlap heavily
    covered = np.zeros(w, bool)
    for x0, _, x1, _ in boxes:
        covered[x0:x1] = True
    assert covered.all()


# 21 parts: centres x = 100, 120, ..., 700 (31); the first four (x0 = c - 176 < 0) all shift to x0 = 0
@pytest.mark.parametrize("n_parts, expected", [(20, 1), (21, 28), (0, 1)])
def test_wide_component_with_few_parts_gets_one_tile(n_parts, expected):
    box = (100, 180, 700, 220)  # aspect 15, but elongated only with > 20 parts
    tiles = plan_tiles([C(0, box, n_parts=n_parts)], (400, 1000))
    assert len(tiles) == expected
    if expected == 1:
        assert tiles[0].reason == "clipped"  # side 600 > H = 400
        assert _side(tiles[0]) == 400


def test_aspect_threshold_is_strict():
    square_ish = (100, 100, 250, 200)  # 150 / 100 = 1.5: not elongated
    assert len(plan_tiles([C(0, square_ish, n_parts=50)], (1000, 1000))) == 1
    longer = (100, 100, 251, 200)  # 1.51: elongated
    assert plan_tiles([C(0, longer, n_parts=50)], (1000, 1000))[0].reason == "elongated"


def test_small_image_clips_the_side_and_records_it():
    tiles = plan_tiles([C(0, (10, 10, 30, 30)), C(1, (250, 150, 280, 190))], (200, 300))
    assert [t.reason for t in tiles] == ["clipped", "clipped"]
    assert all(_side(t) == 200 and _inside_image(t, 200, 300) and t.clipped for t in tiles)
    assert tiles[0].box == (0, 0, 200, 200) and tiles[1].box == (100, 0, 300, 200)
    # elongated tiles are clipped likewise
    tiles = plan_tiles([C(0, (0, 100, 2000, 140), n_parts=30)], (300, 2000))
    assert all(t.reason == "elongated_clipped" and _side(t) == 300 and t.clipped for t in tiles)
    # not clipped when the image is large enough
    assert not plan_tiles([C(0, (10, 10, 30, 30))], (352, 352))[0].clipped


def test_no_components_gives_the_whole_image():
    assert plan_tiles([], (240, 320)) == [Tile(component_id=-1, box=(0, 0, 320, 240), reason="whole_image")]


def test_order_is_deterministic_and_follows_components():
    comps = [C(5, (700, 700, 720, 720)), C(2, (0, 0, 10, 10)), C(9, (100, 400, 900, 430), n_parts=40)]
    first = plan_tiles(comps, (1000, 1000))
    assert first == plan_tiles(comps, (1000, 1000))
    ids = [t.component_id for t in first]
    assert ids[:2] == [5, 2] and set(ids[2:]) == {9}


@pytest.mark.parametrize(
    "comps, hw, kwargs, match",
    [
        ([C(0, (0, 0, 10, 10))], (0, 10), {}, "image_hw"),
        ([C(0, (0, 0, 10, 10))], (10.5, 10), {}, "image_hw"),
        ([C(0, (0, 0, 10, 10))], (10,), {}, "image_hw"),
        ([C(0, (0, 0, 11, 10))], (10, 10), {}, r"components\[0\]"),
        ([C(0, (0, 0, 10, 10)), C(1, (5, 5, 5, 8))], (10, 10), {}, r"components\[1\]"),
        ([C(0, (0, 0, 10, 10))], (10, 10), {"min_tile": 0}, "min_tile"),
        ([C(0, (0, 0, 10, 10))], (10, 10), {"min_tile": 3.5}, "min_tile"),
        ([C(0, (0, 0, 10, 10))], (10, 10), {"elongated_aspect": 0.5}, "elongated_aspect"),
        ([C(0, (0, 0, 10, 10))], (10, 10), {"elongated_min_parts": -1}, "elongated_min_parts"),
        ([object()], (10, 10), {}, r"components\[0\]"),
    ],
)
def test_invalid_arguments(comps, hw, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_tiles(comps, hw, **kwargs)


def test_random_layouts_keep_the_invariants():
    rng = np.random.default_rng(1234)
    n_elongated = n_clipped = 0
    for _ in range(300):
        h, w = int(rng.integers(100, 1500)), int(rng.integers(100, 1500))
        min_tile = int(rng.choice([64, 224, 352]))
        comps = []
        for cid in range(int(rng.integers(0, 6))):
            bw, bh = int(rng.integers(1, w + 1)), int(rng.integers(1, h + 1))
            if rng.random() < 0.5:  # many thin ones
                bh = int(rng.integers(1, max(2, bh // 4)))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            comps.append(C(cid, (x0, y0, x0 + bw, y0 + bh), n_parts=int(rng.integers(0, 40))))
        tiles = plan_tiles(comps, (h, w), min_tile=min_tile)
        assert tiles and all(t.reason in REASONS for t in tiles)
        if not comps:
            assert tiles == [Tile(-1, (0, 0, w, h), "whole_image")]
            continue
        assert sorted({t.component_id for t in tiles}) == [c.id for c in comps]
        for comp in comps:
            own = [t for t in tiles if t.component_id == comp.id]
            x0, y0, x1, y1 = comp.box
            bw, bh = x1 - x0, y1 - y0
            elongated = max(bw, bh) > 1.5 * min(bw, bh) and comp.n_parts > 20
            side_wanted = max(min_tile, min(bw, bh) if elongated else max(bw, bh))
            assert len(set(t.box for t in own)) == len(own)
            for t in own:
                assert _inside_image(t, h, w)
                assert _side(t) == min(side_wanted, h, w)
                assert t.clipped == (side_wanted > min(h, w))
                assert t.reason.startswith("elongated") == elongated
            # the component's centre lies inside one of its tiles
            assert any(_contains(t, (x0 + x1) / 2, (y0 + y1) / 2) for t in own)
            if elongated:
                n_elongated += 1
                long_axis = 0 if bw >= bh else 1
                # along the long axis, the tiles cover the whole box (consecutive tiles overlap)
                covered = np.zeros(max(w, h), bool)
                for t in own:
                    covered[t.box[long_axis] : t.box[long_axis + 2]] = True
                assert covered[comp.box[long_axis] : comp.box[long_axis + 2]].all()
            else:
                assert len(own) == 1
                if not own[0].clipped:  # an unclipped single tile holds the whole component
                    tx0, ty0, tx1, ty1 = own[0].box
                    assert tx0 <= x0 and ty0 <= y0 and x1 <= tx1 and y1 <= ty1
            n_clipped += any(t.clipped for t in own)
    assert n_elongated > 20 and n_clipped > 20  # the loop exercised both rules
