"""The pictures of the report: colour scale, overlays, outlines, the page's shared colour range,
the threshold and the choice of examples, and the selective read of masks rows."""

import math

import matplotlib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import f1_score

from pipeline.ops.heatmap import encode_png16
from pipeline.report import render
from pipeline.report.export import relative_name
from pipeline.report.report import colour_scale, select, threshold_of
from pipeline.report.runread import RunData, mask_rows


def test_colour_scale_maps_the_range_onto_the_colour_map_and_clips():
    scale = render.ColourScale(0.2, 0.6, "jet")
    lut = (matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    out = scale.rgb(np.array([[0.0, 0.2, 0.4, 0.6, 0.9]]))
    assert (out[0, 0] == lut[0]).all() and (out[0, 1] == lut[0]).all()  # below lo: clipped to the first colour
    assert (out[0, 3] == lut[255]).all() and (out[0, 4] == lut[255]).all()
    assert (out[0, 2] == lut[128]).all()  # 0.4 is the middle: round(0.5 * 255) = 128
    with pytest.raises(ValueError, match="hi > lo"):
        render.ColourScale(1.0, 1.0)


def test_overlay_blends_resizes_and_outlines():
    rgb = np.full((40, 60, 3), 200, np.uint8)
    heat = np.zeros((20, 30))
    heat[5:10, 5:10] = 1.0
    scale = render.ColourScale(0.0, 1.0)
    pred = np.zeros((20, 30), bool)
    pred[2:12, 2:12] = True
    truth = np.zeros((40, 60), bool)
    truth[30:38, 40:55] = True
    out = render.overlay(rgb, heat, scale, (40, 60), alpha=0.5, predicted=pred, truth=truth)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert tuple(out[4, 10]) == render.PREDICTED_RGB  # the top edge of the predicted box (rows 4..23 at 2x)
    assert tuple(out[30, 45]) == render.TRUTH_RGB
    far = out[39, 0].astype(float)  # away from both outlines: half image, half the colour of 0
    expected = 0.5 * 200 + 0.5 * scale.rgb(np.zeros((1, 1)))[0, 0]
    assert np.abs(far - expected).max() <= 1
    alone = render.overlay(None, heat, scale, (10, 15))
    assert alone.shape == (10, 15, 3)


def test_outline_is_the_boundary_of_the_mask():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    edge = render.outline(mask)
    assert edge.sum() == 16 and not edge[3:6, 3:6].any() and edge[2, 2:7].all()
    assert not render.outline(np.zeros((4, 4), bool)).any()


def test_pngs_and_svgs_are_data_uris():
    uri = render.png_data_uri(np.zeros((4, 5, 3), np.uint8))
    assert uri.startswith("data:image/png;base64,")
    svg = render.curve_svg(np.array([0, 0.5, 1]), np.array([0, 0.8, 1]), title="t", xlabel="x", ylabel="y")
    assert svg.startswith("<svg") and "<text" in svg  # text stays text (svg.fonttype none)
    assert render.svg_data_uri(svg).startswith("data:image/svg+xml;base64,")


def _run(tmp_path, maps, map_range=(0.0, 1.0), group=2):
    """A run folder with only a masks table (several row groups), enough for mask_rows and the scale."""
    rows = [
        {
            "image_id": f"id{i}",
            "map_png": encode_png16(m, *map_range),
            "map_min": map_range[0],
            "map_max": map_range[1],
            "threshold": None,
            "mask_rle": None,
            "refined": False,
            "refine_rle": None,
        }
        for i, m in enumerate(maps)
    ]
    (tmp_path / "masks").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "masks" / "shard-00000.parquet", row_group_size=group)
    record = {"run_id": "r", "map_range": list(map_range), "model": {"pixel_method": "winclip_windows"}}
    return RunData(str(tmp_path), None, record, pd.DataFrame(), None, {}, "method")


def test_mask_rows_reads_the_wanted_rows_across_row_groups(tmp_path):
    rng = np.random.default_rng(0)
    maps = [rng.random((6, 8)) for _ in range(7)]
    run = _run(tmp_path, maps)
    assert pq.ParquetFile(tmp_path / "masks" / "shard-00000.parquet").num_row_groups == 4
    got = mask_rows(run, {"id1", "id4", "id6", "missing"})
    assert sorted(got) == ["id1", "id4", "id6"]
    assert got["id4"]["map_png"] == encode_png16(maps[4], 0.0, 1.0)


def test_auto_colour_scale_is_one_percentile_range_over_all_shown_maps(tmp_path):
    rng = np.random.default_rng(1)
    maps = [0.2 + 0.1 * rng.random((10, 10)), 0.5 + 0.4 * rng.random((10, 10))]  # two images, different ranges
    run = _run(tmp_path, maps)
    rows = mask_rows(run, {"id0", "id1"})
    scale = colour_scale(run, rows, "auto")
    levels = np.sort(np.concatenate([np.floor(np.clip(m, 0, 1) * 65535 + 0.5).ravel() for m in maps]))
    lo = levels[int(np.ceil(0.005 * len(levels))) - 1] / 65535
    hi = levels[int(np.ceil(0.999 * len(levels))) - 1] / 65535
    assert scale.lo == pytest.approx(lo, abs=1e-9) and scale.hi == pytest.approx(hi, abs=1e-9)
    assert scale.lo < 0.21 and scale.hi > 0.89  # pooled: neither image's own range
    assert (colour_scale(run, rows, "stored").lo, colour_scale(run, rows, "stored").hi) == (0.0, 1.0)
    assert (colour_scale(run, rows, "0.1,0.7").lo, colour_scale(run, rows, "0.1,0.7").hi) == (0.1, 0.7)
    with pytest.raises(Exception, match="LO,HI"):
        colour_scale(run, rows, "bad")


def test_threshold_is_f1_max_with_labels_else_a_percentile():
    rng = np.random.default_rng(2)
    values = rng.random(50)
    labels = (values + 0.3 * rng.random(50) > 0.7).astype(object)
    t, how = threshold_of(values, labels)
    best = max(f1_score(labels.astype(int), values >= v) for v in values)
    assert f1_score(labels.astype(int), values >= t) == pytest.approx(best) and "F1" in how
    t2, how2 = threshold_of(values, np.array([None] * 50, dtype=object))
    assert t2 == pytest.approx(np.quantile(values, 0.95)) and "percentile" in how2
    t3, _ = threshold_of(np.zeros(0), np.zeros(0, dtype=object))
    assert math.isnan(t3)


def test_select_takes_the_top_and_the_nearest_others():
    frame = pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(10)],
            "uri": [f"u{k}" for k in range(10)],
            "status": ["ok"] * 9 + ["error"],
            "value": [0.1 * k for k in range(9)] + [np.nan],
        }
    )
    high, near = select(frame, 3, 0.42)
    assert list(high["image_id"]) == ["i8", "i7", "i6"]
    assert set(near["image_id"]) == {"i4", "i5", "i3"} and not set(near["image_id"]) & set(high["image_id"])


def test_export_names_follow_the_input_tree():
    assert relative_name("/data/bottle/test/good/000.png", "/data", "bottle") == "bottle/test/good/000"
    assert relative_name("s3://b/x/cat/1.jpg", "s3://b/x/", "cat") == "cat/1"
    assert relative_name("/elsewhere/a.png", "/data", "bottle") == "bottle/a"
