"""pipeline.io.synthetic: the MVTec-layout synthetic dataset."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataSpec
from pipeline.io.layouts import list_inputs
from pipeline.io.synthetic import DEFECTS, make_dataset, render_defect, render_normal


def _read(path):
    return np.asarray(Image.open(path))


def test_make_dataset_tree_and_summary(tmp_path):
    root = str(tmp_path / "ds")
    start = time.perf_counter()
    summary = make_dataset(root)
    assert time.perf_counter() - start < 2.0
    assert summary["root"] == root
    assert summary["categories"] == ["widget", "tile"]
    assert summary["defects"] == list(DEFECTS)
    assert summary["n_test"] == 16
    assert summary["counts"]["widget"] == {
        "train": 4,
        "test_good": 4,
        "test_anomalous": 4,
        "masks": 4,
        "by_defect": {"scratch": 2, "hole": 2},
    }
    files = sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
    )
    assert len(files) == summary["n_files"] == 32
    for category in ("widget", "tile"):
        assert f"{category}/train/good/003.png" in files
        assert f"{category}/test/good/003.png" in files
        assert f"{category}/test/scratch/001.png" in files
        assert f"{category}/test/hole/001.png" in files
        assert f"{category}/ground_truth/hole/001_mask.png" in files
        assert not any(f.startswith(f"{category}/ground_truth/good") for f in files)


def test_images_and_masks_are_consistent(tmp_path):
    make_dataset(str(tmp_path), categories=("widget",), n_good=1, n_bad=2, size=64)
    good = _read(tmp_path / "widget/test/good/000.png")
    assert good.shape == (64, 64, 3) and good.dtype == np.uint8
    assert good.std() > 5  # textured, not flat
    for defect, dark in (("scratch", False), ("hole", True)):
        image = _read(tmp_path / f"widget/test/{defect}/000.png")
        mask = _read(tmp_path / f"widget/ground_truth/{defect}/000_mask.png")
        assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
        inside = image[mask > 0].mean()
        assert (inside < 40) if dark else (inside > 200)
        assert 0 < (mask > 0).mean() < 0.2


def test_mask_marks_exactly_the_changed_pixels():
    for kind in ("widget", "tile", "other"):
        for defect in DEFECTS:
            rng = np.random.default_rng(3)
            image, region = render_normal(kind, rng, 80)
            out, mask = render_defect(image, region, defect, rng)
            changed = np.any(out != image, axis=-1)
            assert changed.any()
            np.testing.assert_array_equal(changed, mask > 0)
            assert not (mask[~region]).any()


def test_deterministic_per_seed(tmp_path):
    make_dataset(str(tmp_path / "a"), categories=("tile",), n_good=2, n_bad=2, seed=7)
    make_dataset(str(tmp_path / "b"), categories=("tile",), n_good=2, n_bad=2, seed=7)
    make_dataset(str(tmp_path / "c"), categories=("tile",), n_good=2, n_bad=2, seed=8)
    rel = "tile/test/scratch/000.png"
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    # different normal images within one dataset
    assert not np.array_equal(_read(tmp_path / "a/tile/test/good/000.png"), _read(tmp_path / "a/tile/test/good/001.png"))


def test_listed_as_mvtec(tmp_path):
    make_dataset(str(tmp_path), n_good=3, n_bad=3, n_train=1)
    layout, df = list_inputs(str(tmp_path), DataSpec())
    assert layout == "mvtec"
    assert len(df) == 12
    assert df.groupby("category")["gt_label"].sum().to_dict() == {"tile": 3, "widget": 3}
    anomalous = df[df["gt_label"] == 1]
    assert anomalous["mask_uri"].notna().all()
    assert all(os.path.exists(m) for m in anomalous["mask_uri"])
    assert df[df["gt_label"] == 0]["mask_uri"].isna().all()


@pytest.mark.parametrize(
    "kwargs",
    [{"categories": ()}, {"categories": ("a/b",)}, {"categories": ("x", "x")}, {"n_good": -1}, {"size": 8}],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_dataset(str(tmp_path), **kwargs)
