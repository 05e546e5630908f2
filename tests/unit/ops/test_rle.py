"""COCO RLE (pipeline.ops.rle) against hand-derived examples and round trips."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ops.rle import area, compress_counts, counts_from_mask, decode, decompress_counts, encode

# 3x3 example. Column-major: col 0 = 0,0,1; col 1 = 1,1,0; col 2 = 0,1,0
# -> 0 0 1 1 1 0 0 1 0 -> runs [2, 3, 2, 1, 1].
# Compressed: 2 -> '2', 3 -> '3', 2 -> '2' (i <= 2: values as is);
# i=3: 1 - 3 = -2 -> low 5 bits 30 (sign bit 0x10 set, rest -1: stop) -> chr(30 + 48) = 'N';
# i=4: 1 - 2 = -1 -> 31 -> 'O'.
HAND_MASK = np.array([[0, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=np.uint8)


def test_hand_example():
    assert counts_from_mask(HAND_MASK) == [2, 3, 2, 1, 1]
    rle = encode(HAND_MASK)
    assert rle == {"size": [3, 3], "counts": "232NO"}
    assert np.array_equal(decode(rle), HAND_MASK.astype(bool))
    assert area(rle) == 4


@pytest.mark.parametrize(
    "counts,expected",
    [
        # 100 = 0b11_00100: low group 4 with continuation -> chr(4 + 0x20 + 48) = 'T', then chr(3 + 48) = '3'
        ([100], "T3"),
        ([0, 100], "0T3"),
        # 16 has the group sign bit 0x10 set but is positive: a second group 0 follows -> '`', '0'
        ([16], "`0"),
        # i = 3 writes 3 - counts[1] = 0 -> '0'
        ([5, 3, 5, 3], "5350"),
        # i = 3 writes 40 - counts[1] = 39 = 0b1_00111 -> chr(7 + 0x20 + 48) = 'W', chr(1 + 48) = '1'
        ([1, 1, 1, 40], "111W1"),
    ],
)
def test_compress_known_values(counts, expected):
    assert compress_counts(counts) == expected
    assert decompress_counts(expected) == counts


def test_runs_are_column_major_and_start_with_zeros():
    m = np.zeros((3, 3), dtype=bool)
    m[0, 1] = True  # row 0, col 1: flat index 3 in column-major order (1 in row-major)
    assert counts_from_mask(m) == [3, 1, 5]
    m = np.ones((2, 2), dtype=bool)
    assert counts_from_mask(m) == [0, 4]
    assert counts_from_mask(np.zeros((2, 5))) == [10]


def test_decode_uncompressed_counts():
    mask = decode({"size": [2, 3], "counts": [1, 2, 3]})
    assert mask.dtype == bool
    assert np.array_equal(mask, np.array([[0, 1, 0], [1, 0, 0]], dtype=bool))
    assert area({"size": [2, 3], "counts": [1, 2, 3]}) == 2
    # bytes counts (pycocotools' own output type) are accepted too
    assert np.array_equal(decode({"size": [3, 3], "counts": b"232NO"}), HAND_MASK.astype(bool))


def _masks():
    rng = np.random.default_rng(7)
    for h, w in [(1, 1), (1, 7), (7, 1), (5, 3), (13, 17), (31, 29), (101, 67)]:
        yield np.zeros((h, w), bool)
        yield np.ones((h, w), bool)
        for p in (0.05, 0.5, 0.95):
            yield rng.random((h, w)) < p
        for r, c in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]:
            m = np.zeros((h, w), bool)
            m[r, c] = True
            yield m
            yield ~m
    big = np.zeros((257, 300), bool)
    big[40:200, 17:250] = True  # runs of hundreds of pixels: multi-group counts and large deltas
    big[100:110, 5:290] = False
    yield big


def test_round_trips():
    for m in _masks():
        rle = encode(m)
        assert rle["size"] == list(m.shape)
        assert isinstance(rle["counts"], str)
        back = decode(rle)
        assert back.shape == m.shape and np.array_equal(back, m)
        assert area(rle) == int(m.sum())
        counts = counts_from_mask(m)
        assert sum(counts) == m.size
        assert np.array_equal(decode({"size": list(m.shape), "counts": counts}), m)


def test_uint8_and_bool_masks_encode_alike():
    m = np.random.default_rng(1).random((9, 11)) < 0.3
    assert encode(m) == encode(m.astype(np.uint8) * 255)


def test_errors():
    with pytest.raises(ValueError, match="2-D"):
        encode(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="sum"):
        decode({"size": [3, 3], "counts": [2, 3]})
    with pytest.raises(ValueError, match="invalid character"):
        decode({"size": [3, 3], "counts": "23 NO"})
    with pytest.raises(ValueError, match="truncated"):
        decompress_counts("T")  # continuation bit set on the last character
    with pytest.raises(ValueError, match="size"):
        decode({"counts": [1]})
