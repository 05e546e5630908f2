"""pipeline.synthetic: the MVTec-layout synthetic dataset."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataSpec
from pipeline.io.layouts import list_inputs
from pipeline.synthetic import DEFECTS, make_dataset, render_defect, render_normal


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
    assert not np.array_equal(
        _read(tmp_path / "a/tile/test/good/000.png"), _read(tmp_path / "a/tile/test/good/001.png")
    )


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


# --- make_multi_instance_dataset ---------------------------------------------------------------

from pipeline.synthetic import make_multi_instance_dataset  # noqa: E402


def test_multi_instance_tree_summary_and_determinism(tmp_path):
    summary = make_multi_instance_dataset(str(tmp_path / "a"), n_good=2, n_bad=3, size=(96, 128), seed=5)
    again = make_multi_instance_dataset(str(tmp_path / "b"), n_good=2, n_bad=3, size=(96, 128), seed=5)
    make_multi_instance_dataset(str(tmp_path / "c"), n_good=2, n_bad=3, size=(96, 128), seed=6)
    root = tmp_path / "a"
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)
    assert files == [
        "pills/ground_truth/defect/000_mask.png",
        "pills/ground_truth/defect/001_mask.png",
        "pills/ground_truth/defect/002_mask.png",
        "pills/test/defect/000.png",
        "pills/test/defect/001.png",
        "pills/test/defect/002.png",
        "pills/test/good/000.png",
        "pills/test/good/001.png",
    ]
    assert summary["n_files"] == 8 and summary["category"] == "pills"
    assert [i["label"] for i in summary["images"]] == [0, 0, 1, 1, 1]
    assert summary["images"] == again["images"]
    rel = "pills/test/defect/001.png"
    assert (root / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (root / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_multi_instance_boxes_and_defects(tmp_path):
    summary = make_multi_instance_dataset(str(tmp_path), n_good=4, n_bad=4, size=(128, 160), instances=(2, 4))
    counts = set()
    for info in summary["images"]:
        image = _read(tmp_path / info["path"])
        assert image.shape == (128, 160, 3) and image.dtype == np.uint8
        n = info["n_instances"]
        counts.add(n)
        assert 2 <= n <= 4 and len(info["boxes"]) == n
        background = np.median(np.concatenate([image[:4].reshape(-1, 3), image[-4:].reshape(-1, 3)]), axis=0)
        for k, (x0, y0, x1, y1) in enumerate(info["boxes"]):
            assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 128
            centre = image[(y0 + y1) // 2, (x0 + x1) // 2].astype(float)
            assert np.abs(centre - background).max() > 40  # an object, not background
            for other in info["boxes"][k + 1 :]:  # separated objects: boxes do not overlap
                assert min(x1, other[2]) <= max(x0, other[0]) or min(y1, other[3]) <= max(y0, other[1])
        if info["label"] == 0:
            assert info["mask_path"] is None and info["defect_instance"] is None
            continue
        mask = _read(tmp_path / info["mask_path"])
        assert mask.shape == (128, 160) and set(np.unique(mask)) == {0, 255}
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = info["boxes"][info["defect_instance"]]
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1  # on that object
        painted = image[mask > 0].astype(float).mean(axis=1)
        assert np.all((painted < 40) | (painted > 225))  # a dark or light defect
        assert info["defect_kind"] in ("spot", "scratch")
    assert len(counts) > 1


def test_multi_instance_listed_as_mvtec(tmp_path):
    make_multi_instance_dataset(str(tmp_path), n_good=2, n_bad=2, size=(64, 64))
    layout, df = list_inputs(str(tmp_path), DataSpec())
    assert layout == "mvtec"
    assert len(df) == 4 and int(df["gt_label"].sum()) == 2
    assert df[df["gt_label"] == 1]["mask_uri"].notna().all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"category": "a/b"},
        {"n_good": -1},
        {"size": (32, 128)},
        {"size": 96},
        {"instances": (0, 2)},
        {"instances": (3, 2)},
        {"instances": (1, 9)},
    ],
)
def test_multi_instance_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_multi_instance_dataset(str(tmp_path), **kwargs)


def test_multi_instance_defect_mask_marks_exactly_the_changed_pixels():
    from pipeline.synthetic import _multi_defect, _render_instances

    for seed in range(4):
        rng = np.random.default_rng(seed)
        image, masks, colours = _render_instances(rng, (96, 128), 3)
        assert len(masks) == 3 and not (masks[0] & masks[1]).any()
        for kind in ("spot", "scratch"):
            out, mask = _multi_defect(image, masks[1], colours[1], rng, kind)
            changed = np.any(out != image, axis=-1)
            assert changed.any()
            np.testing.assert_array_equal(changed, mask > 0)
            assert not (mask[~masks[1]]).any()
