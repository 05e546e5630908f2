"""16-bit PNG heatmaps and bilinear resizing (pipeline.ops.heatmap)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from pipeline.ops.heatmap import LEVELS, decode_png16, dequantise, encode_png16, quantise, resize_map

VMIN, VMAX = -2.0, 3.0
STEP = (VMAX - VMIN) / 65535


def _map(h=23, w=37, seed=0):
    return np.random.default_rng(seed).uniform(VMIN, VMAX, size=(h, w))


def test_round_trip_within_one_step():
    x = _map()
    x[0, 0], x[-1, -1] = VMIN, VMAX
    back = decode_png16(encode_png16(x, VMIN, VMAX), VMIN, VMAX)
    assert back.dtype == np.float64 and back.shape == x.shape
    err = np.abs(back - x).max()
    assert err <= STEP / 2 + 1e-12
    assert err > 0  # really quantised (a float round trip would be exact)
    assert back[0, 0] == VMIN and back[-1, -1] == VMAX


def test_levels_exact():
    x = _map(seed=1)
    q = quantise(x, VMIN, VMAX)
    assert q.dtype == np.uint16
    data = encode_png16(x, VMIN, VMAX)
    with Image.open(io.BytesIO(data)) as im:
        stored = np.asarray(im).astype(np.int64)
    assert np.array_equal(stored, q)
    assert np.array_equal(quantise(decode_png16(data, VMIN, VMAX), VMIN, VMAX), q)
    assert np.array_equal(quantise(dequantise(q, VMIN, VMAX), VMIN, VMAX), q)
    # ends and the middle (32767.5 rounds half up)
    assert quantise(np.array([VMIN, VMAX, 0.5]), VMIN, VMAX).tolist() == [0, LEVELS, 32768]


def test_out_of_range_values_are_clipped():
    x = np.array([[-100.0, VMIN - 1e-9, 0.25], [VMAX + 1e-9, 1e6, 1.0]])
    back = decode_png16(encode_png16(x, VMIN, VMAX), VMIN, VMAX)
    assert back[0, 0] == VMIN and back[0, 1] == VMIN
    assert back[1, 0] == VMAX and back[1, 1] == VMAX
    assert abs(back[0, 2] - 0.25) <= STEP / 2 + 1e-12


def test_png_is_16_bit_grayscale():
    data = encode_png16(_map(5, 9), VMIN, VMAX)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "I;16" and im.size == (9, 5)
    # IHDR: width, height, bit depth 16, colour type 0 (grayscale)
    assert data[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, colour) == (9, 5, 16, 0)


@pytest.mark.parametrize(
    "values,vmin,vmax,match",
    [
        (np.array([[0.0, np.nan]]), 0.0, 1.0, "finite"),
        (np.array([[0.0, np.inf]]), 0.0, 1.0, "finite"),
        (np.zeros((2, 2)), 1.0, 1.0, "greater"),
        (np.zeros((2, 2)), 1.0, 0.0, "greater"),
        (np.zeros((2, 2)), 0.0, np.nan, "finite"),
        (np.zeros((2, 2, 3)), 0.0, 1.0, "2-D"),
        (np.zeros(4), 0.0, 1.0, "2-D"),
        (np.zeros((0, 3)), 0.0, 1.0, "empty"),
    ],
)
def test_encode_errors(values, vmin, vmax, match):
    with pytest.raises(ValueError, match=match):
        encode_png16(values, vmin, vmax)


def test_quantise_rejects_nan_and_decode_rejects_8_bit():
    with pytest.raises(ValueError, match="finite"):
        quantise(np.array([0.5, np.nan]), 0.0, 1.0)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="16-bit"):
        decode_png16(buf.getvalue(), 0.0, 1.0)


def test_resize_constant_and_ramp():
    out = resize_map(np.full((7, 5), 0.3), (20, 13))
    assert out.shape == (20, 13) and np.allclose(out, 0.3, rtol=0, atol=1e-15)
    ramp = np.tile(np.arange(6, dtype=float), (4, 1))  # increases along columns
    up = resize_map(ramp, (9, 17))
    assert np.all(np.diff(up, axis=1) >= 0) and np.any(np.diff(up, axis=1) > 0)
    assert np.allclose(np.diff(up, axis=0), 0)
    down = resize_map(ramp.T, (3, 2))
    assert np.all(np.diff(down, axis=0) > 0)


def test_resize_hand_values_half_pixel_centres():
    # width 2 -> 4: source x = (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped neighbour)
    assert resize_map(np.array([[0.0, 1.0]]), (1, 4)).tolist() == [[0.0, 0.25, 0.75, 1.0]]
    with pytest.raises(ValueError, match="positive"):
        resize_map(np.zeros((2, 2)), (0, 3))
    with pytest.raises(ValueError, match="2-D"):
        resize_map(np.zeros((2, 2, 1)), (3, 3))


def test_resize_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).random((6, 9))
    for size in [(13, 4), (3, 19), (6, 9), (1, 1), (31, 31)]:
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        assert np.allclose(resize_map(x, size), expected, rtol=0, atol=1e-12), size


def test_nearest_indices_are_the_nearest_resize_row_by_row_and_column_by_column():
    """resize_nearest is separable: the mask indexed by the two index vectors; they never decrease,
    and enlarging hits every source index."""
    from pipeline.ops.heatmap import nearest_indices, resize_nearest

    rng = np.random.default_rng(5)
    for h, w, oh, ow in [(3, 5, 7, 11), (768, 1024, 960, 1280), (37, 41, 37, 90), (100, 80, 333, 81), (9, 9, 4, 5)]:
        mask = rng.random((h, w)) > 0.5
        rows, cols = nearest_indices(h, oh), nearest_indices(w, ow)
        assert np.array_equal(resize_nearest(mask, (oh, ow)), mask[np.ix_(rows, cols)])
        assert (np.diff(rows) >= 0).all() and (np.diff(cols) >= 0).all()
        if oh >= h and ow >= w:
            assert set(rows) == set(range(h)) and set(cols) == set(range(w))
    with pytest.raises(ValueError):
        nearest_indices(0, 4)
