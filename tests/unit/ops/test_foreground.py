"""pipeline.ops.foreground: classical foreground map, SAM mask filtering, union, components."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.ops.foreground import Component, classical_foreground, components, filter_masks, union
from pipeline.synthetic import make_multi_instance_dataset


def _box_iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _inside(point, box):
    x, y = point
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def _mask_iou(a, b):
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def _scene(h=128, w=160, seed=0, noise=4.0):
    """Grey background with a gradient and noise; a dark disc, a bright square, a blue ellipse of
    about the background's luminance. Returns (image, [truth masks])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    img[:] = 140.0
    img += (30.0 * (xx / (w - 1) - 0.5) + 10.0 * (yy / (h - 1) - 0.5))[..., None]
    dark = (xx - 40) ** 2 + (yy - 40) ** 2 <= 18**2
    bright = (np.abs(xx - 110) <= 15) & (np.abs(yy - 45) <= 15)
    blue = ((xx - 80) / 30) ** 2 + ((yy - 100) / 14) ** 2 <= 1
    img[dark] = (45, 40, 38)
    img[bright] = (232, 230, 222)
    img[blue] = (110, 125, 205)
    img += rng.normal(0.0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), [dark, bright, blue]


def test_finds_every_instance_of_generated_multi_instance_images(tmp_path):
    summary = make_multi_instance_dataset(str(tmp_path), n_good=3, n_bad=3, size=(192, 256), instances=(2, 5))
    counts = set()
    for info in summary["images"]:
        image = np.asarray(Image.open(tmp_path / info["path"]).convert("RGB"))
        prob = classical_foreground(image)
        _, comps = components(prob >= 0.5)
        assert len(comps) == info["n_instances"], info["path"]
        counts.add(info["n_instances"])
        for box in info["boxes"]:
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            holders = [c for c in comps if _inside(centre, c.box)]
            assert len(holders) == 1, (info["path"], box, [c.box for c in comps])
            assert _box_iou(box, holders[0].box) > 0.7
    assert len(counts) > 1  # the generator really varies the instance count


def test_dark_bright_and_coloured_objects_on_a_gradient_background():
    image, truths = _scene()
    prob = classical_foreground(image)
    assert prob.shape == image.shape[:2] and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    fg = prob >= 0.5
    labels, comps = components(fg)
    assert len(comps) == 3
    for truth in truths:
        found = labels == np.bincount(labels[truth] + 1).argmax() - 1  # the component covering it
        assert _mask_iou(found, truth) > 0.95
    background = ~np.logical_or.reduce(truths)
    assert np.count_nonzero(fg & background) / np.count_nonzero(background) < 0.005
    assert float(prob[background].mean()) < 0.05


def test_gradient_model_matters_on_a_strong_gradient():
    # A steep illumination ramp: a constant background colour cannot explain it.
    h, w = 96, 128
    xx = np.mgrid[0:h, 0:w][1].astype(np.float64)
    img = np.repeat((60.0 + 140.0 * xx / (w - 1))[..., None], 3, axis=-1)
    obj = (np.abs(xx - 64) <= 10) & (np.abs(np.mgrid[0:h, 0:w][0] - 48) <= 10)
    img[obj] = (200, 40, 40)
    img = np.clip(img + np.random.default_rng(1).normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    with_gradient = classical_foreground(img) >= 0.5
    constant = classical_foreground(img, gradient=False) >= 0.5
    assert _mask_iou(with_gradient, obj) > 0.9
    assert _mask_iou(constant, obj) < 0.5  # the ramp itself becomes "foreground"


def test_object_crossing_the_border_band_does_not_spoil_the_background_model():
    image, truths = _scene()
    big = np.zeros(image.shape[:2], bool)
    big[:, :40] = True  # covers the whole left border band (~20% of the band)
    image[big] = (30, 90, 40)
    prob = classical_foreground(image)
    assert _mask_iou(prob >= 0.5, big | truths[1] | truths[2]) > 0.9


def test_holes_are_filled_and_small_specks_are_zeroed():
    image, _ = _scene(noise=2.0)
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    hole = (xx - 40) ** 2 + (yy - 40) ** 2 <= 6**2  # background colour inside the dark disc
    image[hole] = image[5, 40]
    speck = (np.abs(xx - 140) <= 2) & (np.abs(yy - 110) <= 2)  # 25 px dark speck
    image[speck] = (20, 20, 20)
    keep_specks = classical_foreground(image, open_radius=0, min_area=0.0)
    cleaned = classical_foreground(image, open_radius=0, min_area=0.003)  # 0.003 * 128 * 160 = 61 px
    core = (np.abs(xx - 140) <= 1) & (np.abs(yy - 110) <= 1)  # the 3x3 median eats the corners
    assert np.all(keep_specks[core] >= 0.5)
    assert np.all(cleaned[core] == 0.0) and np.all(cleaned[speck] < 0.5)
    # the hole is filled: exactly 0.5 where the raw probability was low, >= 0.5 everywhere in it
    assert np.all(cleaned[hole] >= 0.5)
    assert np.any(cleaned[hole] == 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"border": 0.0},
        {"border": 0.6},
        {"threshold": 0.0},
        {"softness": -1.0},
        {"min_scale": 0.0},
        {"min_area": 1.0},
        {"iterations": 0},
        {"open_radius": -1},
        {"close_radius": 1.5},
        {"smooth": 0},
        {"smooth": 2.5},
    ],
)
def test_classical_foreground_rejects_bad_parameters(kwargs):
    image, _ = _scene(h=32, w=32)
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        classical_foreground(image, **kwargs)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((16, 16), np.uint8), "RGB"),
        (np.zeros((16, 16, 4), np.uint8), "RGB"),
        (np.zeros((16, 16, 3), np.float32), "uint8"),
        (np.zeros((1, 16, 3), np.uint8), "2x2"),
    ],
)
def test_classical_foreground_rejects_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        classical_foreground(image)


def _mask_with_inside(n_inside, n_total, fg):
    """A bool mask of ``n_total`` pixels, ``n_inside`` of them in ``fg`` (fg = the left columns)."""
    mask = np.zeros(fg.shape, bool)
    inside = np.argwhere(fg)[:n_inside]
    outside = np.argwhere(~fg)[: n_total - n_inside]
    mask[tuple(inside.T)] = True
    mask[tuple(outside.T)] = True
    assert mask.sum() == n_total and (mask & fg).sum() == n_inside
    return mask


def test_filter_masks_keeps_masks_at_least_80_percent_inside():
    fg = np.zeros((20, 20), bool)
    fg[:, :10] = True
    prob = np.where(fg, 0.9, 0.1).astype(np.float32)
    masks = [
        _mask_with_inside(17, 20, fg),  # 85% -> kept
        _mask_with_inside(15, 20, fg),  # 75% -> dropped
        _mask_with_inside(16, 20, fg),  # exactly 80% -> kept
        np.zeros((20, 20), bool),  # empty -> never kept
        _mask_with_inside(0, 30, fg),  # all outside
        _mask_with_inside(40, 40, fg),  # all inside
    ]
    assert filter_masks(masks, prob) == [0, 2, 5]
    assert filter_masks(masks, prob, min_inside=0.75) == [0, 1, 2, 5]
    assert filter_masks(masks, prob, min_inside=0.0) == [0, 1, 2, 4, 5]  # empty still dropped
    assert filter_masks(masks, prob, prob_threshold=0.95) == []  # nothing is foreground
    assert filter_masks(masks, fg) == [0, 2, 5]  # a bool foreground works too

    kept = filter_masks(masks, prob)
    merged = union([masks[i] for i in kept], (20, 20))
    expected = np.zeros((20, 20), bool)
    for i in (0, 2, 5):
        expected[masks[i]] = True
    np.testing.assert_array_equal(merged, expected)
    only_dropped = masks[1] & ~masks[0] & ~masks[2] & ~masks[5]
    assert only_dropped.any() and not merged[only_dropped].any()  # the dropped mask is not merged


def test_filter_masks_and_union_validate_inputs():
    prob = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match=r"masks\[1\]"):
        filter_masks([np.zeros((8, 8), bool), np.zeros((8, 9), bool)], prob)
    with pytest.raises(ValueError, match=r"masks\[0\].*bool"):
        filter_masks([np.zeros((8, 8), np.uint8)], prob)
    with pytest.raises(ValueError, match="fg_prob"):
        filter_masks([], np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="min_inside"):
        filter_masks([], prob, min_inside=1.5)
    with pytest.raises(ValueError, match="shape"):
        union([], (0, 4))
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        union([np.ones((4, 4), bool)], (4, 5))
    np.testing.assert_array_equal(union([], (3, 4)), np.zeros((3, 4), bool))


def test_components_boxes_order_areas_and_min_area():
    fg = np.zeros((12, 16), bool)
    fg[6:10, 1:4] = True  # A: rows 6..9, cols 1..3 -> box (1, 6, 4, 10), area 12
    fg[1:3, 10:15] = True  # B: box (10, 1, 15, 3), area 10
    fg[8, 12] = True  # C: single pixel, area 1
    fg[2:5, 5] = True  # D: box (5, 2, 6, 5), area 3
    labels, comps = components(fg)
    assert [c.box for c in comps] == [(10, 1, 15, 3), (5, 2, 6, 5), (1, 6, 4, 10), (12, 8, 13, 9)]
    assert [c.id for c in comps] == [0, 1, 2, 3]
    assert [c.area for c in comps] == [10, 3, 12, 1]
    assert all(c.n_parts == 0 for c in comps)
    assert labels.dtype == np.int32 and labels.shape == fg.shape
    assert np.all(labels[~fg] == -1)
    for c in comps:
        x0, y0, x1, y1 = c.box
        assert np.count_nonzero(labels == c.id) == c.area
        assert np.all(labels[y0:y1, x0:x1][fg[y0:y1, x0:x1]] >= 0)

    labels, comps = components(fg, min_area=3)
    assert [c.box for c in comps] == [(10, 1, 15, 3), (5, 2, 6, 5), (1, 6, 4, 10)]
    assert labels[8, 12] == -1  # dropped component -> background
    assert set(np.unique(labels)) == {-1, 0, 1, 2}


def test_components_connectivity():
    fg = np.zeros((6, 6), bool)
    fg[1, 1] = fg[2, 2] = fg[3, 3] = True  # a diagonal line
    assert len(components(fg)[1]) == 1
    assert len(components(fg, connectivity=4)[1]) == 3
    with pytest.raises(ValueError, match="connectivity"):
        components(fg, connectivity=6)


def test_components_count_parts_by_largest_overlap():
    fg = np.zeros((10, 20), bool)
    fg[2:8, 1:7] = True  # component 0 (x0 = 1)
    fg[2:8, 10:18] = True  # component 1 (x0 = 10)
    parts = []
    for x in (1, 3, 5):  # three parts inside component 0
        p = np.zeros_like(fg)
        p[2:8, x : x + 2] = True
        parts.append(p)
    straddle = np.zeros_like(fg)
    straddle[4, 5:14] = True  # 2 px on comp 0, 4 px on comp 1 -> comp 1
    parts.append(straddle)
    outside = np.zeros_like(fg)
    outside[0, 8:10] = True  # overlaps nothing -> not counted
    parts.append(outside)
    _, comps = components(fg, parts)
    assert [c.n_parts for c in comps] == [3, 1]
    with pytest.raises(ValueError, match=r"parts\[0\]"):
        components(fg, [np.zeros((10, 21), bool)])
    with pytest.raises(ValueError, match="foreground"):
        components(fg.astype(np.uint8))
    assert isinstance(comps[0], Component)


def test_components_at_the_original_size_are_those_of_the_enlarged_mask():
    """Components found at a working size, brought to the original size: the mask enlarged by
    nearest neighbour, and each box and area exactly those of the component in that mask (the
    components of the enlarged mask are the same ones), boxes inside the image, ids and parts kept."""
    from scipy import ndimage

    from pipeline.ops.foreground import components_at
    from pipeline.ops.heatmap import resize_nearest

    rng = np.random.default_rng(11)
    for trial, (h, w, oh, ow) in enumerate([(48, 64, 96, 128), (60, 80, 119, 163), (77, 50, 77, 101),
                                            (30, 40, 1000, 1333), (64, 64, 64, 64)]):
        small = rng.random((max(2, h // 6), max(2, w // 6))) > 0.6
        fg = np.asarray(Image.fromarray(small.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        fg[rng.integers(0, h, 5), rng.integers(0, w, 5)] = True  # specks, some below min_area
        parts = [fg & (rng.random((h, w)) > 0.5)]
        labels, comps = components(fg, parts, min_area=3)
        mask, big = components_at(labels, comps, (oh, ow))
        assert mask.shape == (oh, ow) and np.array_equal(mask, resize_nearest(labels >= 0, (oh, ow)))
        assert [(c.id, c.n_parts) for c in big] == [(c.id, c.n_parts) for c in comps]
        raw, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        assert n == len(comps), trial  # the enlarged mask has the same components
        assert mask.sum() == sum(c.area for c in big)
        found = {}
        for label, (ys, xs) in enumerate(ndimage.find_objects(raw), start=1):
            found[(xs.start, ys.start, xs.stop, ys.stop)] = int((raw == label).sum())
        assert {c.box: c.area for c in big} == found
        assert all(0 <= c.box[0] < c.box[2] <= ow and 0 <= c.box[1] < c.box[3] <= oh for c in big)
    with pytest.raises(ValueError, match="enlargement"):
        components_at(labels, comps, (oh - 1, ow))
