"""The published numbers beside a run's metrics (``zsad evaluate --paper``), on a metrics table made here."""

import math

import pytest

from pipeline.metrics import papers


def _metrics(**mean):
    row = {"category": "mean", "image_auroc": None, "image_f1_max": None, "image_ap": None, "pixel_auroc": None,
           "pixel_f1_max": None, "pixel_ap": None, "pixel_aupro": None}
    row.update(mean)
    return [{"category": "bottle", "pixel_auroc": 0.5}, row]


def test_a_run_beside_the_published_row_with_the_difference():
    row = papers.published("musc", "mvtec")
    got = papers.beside(_metrics(image_auroc=0.9777, pixel_auroc=0.95, pixel_aupro=float("nan")), row)
    by = {r["column"]: r for r in got}
    assert [r["column"] for r in got] == list(row.values)  # every published metric, in the source's order
    assert by["image_auroc"]["run"] == pytest.approx(97.77) and by["image_auroc"]["difference"] == pytest.approx(
        0.0, abs=1e-9
    )
    assert by["pixel_auroc"]["difference"] == pytest.approx(95.0 - 97.11)
    assert by["pixel_aupro"]["run"] is None and by["pixel_aupro"]["difference"] is None  # NaN: no value
    out = papers.text(got, row, random_weights=True)
    assert "| P-AUROC | 97.11 | 95.00 | -2.11 |" in out and "| PRO | 93.45 | - | - |" in out
    assert "--image-score rscin" in out and "random weights" in out


def test_published_rows_cover_the_presets_and_unknown_ones_are_named():
    for preset, dataset in (("winclip", "visa"), ("aprilgan", "mvtec"), ("clip_sam", "mvtec"), ("musc_fast", "visa")):
        row = papers.published(preset, dataset)
        assert row.values and all(0 < v <= 100 for v in row.values.values())
    with pytest.raises(papers.PaperError, match="no published numbers for preset 'vvv' on 'mvtec'"):
        papers.published("vvv", "mvtec")
    with pytest.raises(papers.PaperError, match="no 'mean' row"):
        papers.beside([{"category": "bottle"}], papers.published("fade", "visa"))
    assert math.isclose(papers.published("fade_fewshot", "visa").values["pixel_auroc"], 97.5)
