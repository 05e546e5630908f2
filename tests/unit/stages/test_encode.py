"""Encode stage on plain dicts: 16-bit heatmaps within one quantisation step, RLE masks."""

import json

import numpy as np
import pytest

from pipeline.ops import heatmap, rle
from pipeline.stages.encode import EncodeStage
from tests.helpers.batches import image_batch


def test_maps_roundtrip_within_one_step_and_rle_matches_threshold():
    rng = np.random.default_rng(0)
    m = rng.random((37, 53)).astype(np.float32)
    maps = [m, np.zeros((0, 0), np.float32)]
    out = EncodeStage(threshold=0.6)(image_batch(None, status=["ok", "error"], anomaly_map=maps, uri=["u0", "u1"]))
    assert "anomaly_map" not in out and list(out["uri"]) == ["u0", "u1"]
    back = heatmap.decode_png16(out["map_png"][0], 0.0, 1.0)
    assert back.shape == (37, 53) and (out["map_height"][0], out["map_width"][0]) == (37, 53)
    assert np.abs(back - m).max() <= 1.0 / 65535 + 1e-7
    mask = rle.decode(json.loads(out["mask_rle"][0]))
    np.testing.assert_array_equal(mask, m >= 0.6)
    # no map: typed nulls (None), not empty strings (issue 10: "no '' <-> None round trip")
    assert out["map_png"][1] is None and out["mask_rle"][1] is None and out["map_height"][1] == 0


def test_no_threshold_no_rle_and_maps_share_one_grid():
    a = np.full((4, 4), 0.25, np.float32)
    b = np.full((4, 4), 0.25 + 0.2 / 65535, np.float32)  # less than a step apart -> same level
    out = EncodeStage()(image_batch(None, status=["ok", "ok"], anomaly_map=[a, b], uri=["u0", "u1"]))
    assert list(out["mask_rle"]) == [None, None]  # no threshold: typed nulls (issue 10), were ""
    la = heatmap.quantise(heatmap.decode_png16(out["map_png"][0], 0, 1), 0, 1)
    lb = heatmap.quantise(heatmap.decode_png16(out["map_png"][1], 0, 1), 0, 1)
    assert np.array_equal(la, lb) and int(la[0, 0]) == round(0.25 * 65535)


def test_missing_column():
    with pytest.raises(ValueError, match="'anomaly_map'"):
        EncodeStage()({"status": np.array(["ok"], dtype=object)})
