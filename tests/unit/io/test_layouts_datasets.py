"""pipeline.io.layouts: VisA (raw and 1cls), MPDD and BTAD trees written to tmp_path."""

from __future__ import annotations

import os

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataSpec
from pipeline.io.layouts import InputError, detect_layout, list_inputs
from pipeline.io.manifest import MANIFEST_COLUMNS
from tests.helpers.files import touch

VISA_HEADER = "object,split,label,image,mask"




def class_mask(root, rel, values=(0, 1, 2)):
    """A class-index mask PNG (0 background, 1..K defect classes), as in raw VisA."""
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.zeros((4, 6), dtype=np.uint8)
    for k, v in enumerate(values):
        arr[k % 4, k] = v
    Image.fromarray(arr, mode="L").save(path)


def write_csv(root, lines, header=VISA_HEADER):
    path = os.path.join(str(root), "split_csv", "1cls.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join([header, *lines]) + "\n")


def visa_tree(root):
    """Two objects; train rows (one with a label the test split never uses) must be skipped."""
    touch(
        root,
        "candle/Data/Images/Normal/0000.JPG",
        "candle/Data/Images/Normal/0001.JPG",
        "candle/Data/Images/Normal/0002.JPG",
        "candle/Data/Images/Anomaly/000.JPG",
        "pcb1/Data/Images/Normal/0000.JPG",
        "pcb1/Data/Images/Anomaly/000.JPG",
        "pcb1/Data/Images/Anomaly/001.JPG",
    )
    class_mask(root, "candle/Data/Masks/Anomaly/000.png", (0, 1, 2))
    class_mask(root, "pcb1/Data/Masks/Anomaly/000.png", (0, 2))
    class_mask(root, "pcb1/Data/Masks/Anomaly/001.png", (1,))
    write_csv(
        root,
        [
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
            "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
            "candle,test,normal,candle/Data/Images/Normal/0002.JPG,",
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
            "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
            "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png",
            "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/001.JPG,pcb1/Data/Masks/Anomaly/001.png",
        ],
    )
    return str(root)


def rel(df, root):
    return [u[len(str(root)) + 1 :] for u in df["uri"]]


# --------------------------------------------------------------------------------------------
# visa (raw)
# --------------------------------------------------------------------------------------------


def test_visa_test_split_labels_masks_and_stats(tmp_path):
    root = visa_tree(tmp_path)
    layout, df = list_inputs(root, DataSpec(layout="visa"))
    assert layout == "visa"
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert rel(df, root) == [
        "candle/Data/Images/Anomaly/000.JPG",
        "candle/Data/Images/Normal/0001.JPG",
        "candle/Data/Images/Normal/0002.JPG",
        "pcb1/Data/Images/Anomaly/000.JPG",
        "pcb1/Data/Images/Anomaly/001.JPG",
    ]
    # the train rows (candle/Normal/0000, pcb1/Normal/0000) are skipped
    assert not any("Normal/0000" in u for u in df["uri"])
    assert list(df["category"]) == ["candle", "candle", "candle", "pcb1", "pcb1"]
    assert list(df["gt_label"]) == [1, 0, 0, 1, 1]
    assert df["mask_uri"][0] == os.path.join(root, "candle/Data/Masks/Anomaly/000.png")
    assert df["mask_uri"][1] is None and df["mask_uri"][2] is None
    assert df["mask_uri"][4] == os.path.join(root, "pcb1/Data/Masks/Anomaly/001.png")
    assert list(df["size"]) == [1, 1, 1, 1, 1]
    assert df["mtime"].notna().all()
    # the masks are class-index images: values 0/1/2 survive the round trip
    assert set(np.unique(np.asarray(Image.open(df["mask_uri"][0])))) == {0, 1, 2}


def test_visa_category_filter_and_unknown_category(tmp_path):
    root = visa_tree(tmp_path)
    _, df = list_inputs(root, DataSpec(layout="visa", category="pcb1"))
    assert set(df["category"]) == {"pcb1"} and len(df) == 2
    with pytest.raises(InputError, match=r"'nope' not found.*available: candle, pcb1"):
        list_inputs(root, DataSpec(layout="visa", category="nope"))


def test_visa_auto_detected_from_split_csv(tmp_path):
    root = visa_tree(tmp_path)
    assert detect_layout(root) == "visa"
    layout, df = list_inputs(root, DataSpec())
    assert layout == "visa" and len(df) == 5


def test_visa_missing_csv(tmp_path):
    touch(tmp_path, "candle/Data/Images/Normal/0000.JPG")
    with pytest.raises(InputError, match=r"split_csv/1cls\.csv is missing"):
        list_inputs(str(tmp_path), DataSpec(layout="visa"))


def test_visa_csv_missing_columns(tmp_path):
    touch(tmp_path, "candle/Data/Images/Normal/0000.JPG")
    write_csv(tmp_path, ["candle,test,normal,candle/Data/Images/Normal/0000.JPG"], header="object,split,label,image")
    with pytest.raises(InputError, match=r"1cls\.csv: missing column\(s\) mask"):
        list_inputs(str(tmp_path), DataSpec(layout="visa"))


def test_visa_unknown_label_names_row(tmp_path):
    touch(tmp_path, "candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG")
    write_csv(
        tmp_path,
        [
            "candle,test,normal,candle/Data/Images/Normal/0000.JPG,",
            "candle,test,good,candle/Data/Images/Normal/0001.JPG,",
        ],
    )
    with pytest.raises(InputError, match=r"1cls\.csv: row 2 \(line 3\): unknown label 'good'"):
        list_inputs(str(tmp_path), DataSpec(layout="visa"))


def test_visa_anomaly_without_mask_is_an_error_not_normal(tmp_path):
    touch(tmp_path, "candle/Data/Images/Anomaly/000.JPG")
    write_csv(tmp_path, ["candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,"])
    with pytest.raises(InputError, match=r"row 1 \(line 2\): anomalous image .*000\.JPG has no mask listed"):
        list_inputs(str(tmp_path), DataSpec(layout="visa"))


def test_visa_listed_image_or_mask_missing(tmp_path):
    touch(tmp_path, "candle/Data/Images/Anomaly/000.JPG")
    write_csv(tmp_path, ["candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png"])
    with pytest.raises(InputError, match=r"row 1 \(line 2\): mask .*Masks/Anomaly/000\.png not found"):
        list_inputs(str(tmp_path), DataSpec(layout="visa"))
    write_csv(tmp_path, ["candle,test,normal,candle/Data/Images/Normal/9.JPG,"])
    with pytest.raises(InputError, match=r"row 1 \(line 2\): image .*Normal/9\.JPG not found"):
        list_inputs(str(tmp_path), DataSpec(layout="visa"))


def test_visa_on_memory_filesystem_uses_full_uris():
    fs = fsspec.filesystem("memory")
    base = "/zsad-visa-test"
    try:
        fs.pipe(f"{base}/candle/Data/Images/Normal/0001.JPG", b"ab")
        fs.pipe(f"{base}/candle/Data/Images/Anomaly/000.JPG", b"abc")
        fs.pipe(f"{base}/candle/Data/Masks/Anomaly/000.png", b"m")
        fs.pipe(
            f"{base}/split_csv/1cls.csv",
            (
                VISA_HEADER + "\n"
                "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
                "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
            ).encode(),
        )
        layout, df = list_inputs("memory://zsad-visa-test", DataSpec())
        assert layout == "visa"
        assert list(df["uri"]) == [
            "memory:///zsad-visa-test/candle/Data/Images/Anomaly/000.JPG",
            "memory:///zsad-visa-test/candle/Data/Images/Normal/0001.JPG",
        ]
        assert df["mask_uri"][0] == "memory:///zsad-visa-test/candle/Data/Masks/Anomaly/000.png"
        assert list(df["size"]) == [3, 2]
    finally:
        fs.rm(base, recursive=True)


# --------------------------------------------------------------------------------------------
# visa_1cls and mpdd (MVTec-like)
# --------------------------------------------------------------------------------------------


def test_visa_1cls_masks_without_suffix(tmp_path):
    touch(
        tmp_path,
        "candle/train/good/000.JPG",
        "candle/test/good/001.JPG",
        "candle/test/bad/000.JPG",
        "candle/test/bad/001.JPG",
        "candle/ground_truth/bad/001.png",
        "pcb1/test/good/000.JPG",
    )
    class_mask(tmp_path, "candle/ground_truth/bad/000.png", (0, 1, 2))
    root = str(tmp_path)
    layout, df = list_inputs(root, DataSpec(layout="visa_1cls"))
    assert layout == "visa_1cls"
    assert rel(df, root) == [
        "candle/test/bad/000.JPG",
        "candle/test/bad/001.JPG",
        "candle/test/good/001.JPG",
        "pcb1/test/good/000.JPG",
    ]
    assert list(df["gt_label"]) == [1, 1, 0, 0]
    assert list(df["category"]) == ["candle", "candle", "candle", "pcb1"]
    assert df["mask_uri"][0] == os.path.join(root, "candle/ground_truth/bad/000.png")
    assert df["mask_uri"][1] == os.path.join(root, "candle/ground_truth/bad/001.png")
    assert df["mask_uri"][2] is None
    _, only = list_inputs(root, DataSpec(layout="visa_1cls", category="pcb1"))
    assert list(only["category"]) == ["pcb1"]


def test_mpdd_is_listed_like_mvtec(tmp_path):
    touch(
        tmp_path,
        "bracket_black/train/good/000.png",
        "bracket_black/test/good/000.png",
        "bracket_black/test/hole/000.png",
        "bracket_black/test/scratches/003.png",
        "bracket_black/ground_truth/hole/000_mask.png",
        "bracket_black/ground_truth/scratches/003_mask.png",
        "tubes/test/good/000.png",
    )
    root = str(tmp_path)
    layout, df = list_inputs(root, DataSpec(layout="mpdd"))
    assert layout == "mpdd"
    assert rel(df, root) == [
        "bracket_black/test/good/000.png",
        "bracket_black/test/hole/000.png",
        "bracket_black/test/scratches/003.png",
        "tubes/test/good/000.png",
    ]
    assert list(df["gt_label"]) == [0, 1, 1, 0]
    assert df["mask_uri"][2] == os.path.join(root, "bracket_black/ground_truth/scratches/003_mask.png")
    _, mvtec = list_inputs(root, DataSpec(layout="mvtec"))
    assert mvtec.equals(df)


# --------------------------------------------------------------------------------------------
# btad
# --------------------------------------------------------------------------------------------


def btad_tree(root):
    touch(
        root,
        "01/train/ok/0000.bmp",
        "01/test/ok/0000.bmp",
        "01/test/ko/0000.bmp",
        "01/test/ko/0001.bmp",
        "01/test/ko/0002.bmp",
        "01/test/ko/0003.bmp",
        "01/ground_truth/ko/0000.png",
        "01/ground_truth/ko/0001_mask.png",
        "01/ground_truth/ko/0002.bmp",
        # 0003 has no mask
        "03/test/ok/0000.png",
        "03/test/ko/0000.jpg",
        "03/ground_truth/ko/0000.png",
    )
    return str(root)


def test_btad_labels_and_masks_by_stem(tmp_path):
    root = btad_tree(tmp_path)
    layout, df = list_inputs(root, DataSpec(layout="btad"))
    assert layout == "btad"
    assert rel(df, root) == [
        "01/test/ko/0000.bmp",
        "01/test/ko/0001.bmp",
        "01/test/ko/0002.bmp",
        "01/test/ko/0003.bmp",
        "01/test/ok/0000.bmp",
        "03/test/ko/0000.jpg",
        "03/test/ok/0000.png",
    ]
    assert list(df["gt_label"]) == [1, 1, 1, 1, 0, 1, 0]
    assert list(df["category"]) == ["01"] * 5 + ["03"] * 2
    gt = os.path.join(root, "01/ground_truth/ko")
    assert list(df["mask_uri"][:5]) == [
        os.path.join(gt, "0000.png"),
        os.path.join(gt, "0001_mask.png"),
        os.path.join(gt, "0002.bmp"),
        None,
        None,
    ]
    assert df["mask_uri"][5] == os.path.join(root, "03/ground_truth/ko/0000.png")
    assert not any("/train/" in u for u in df["uri"])


def test_btad_auto_detection_and_single_category(tmp_path):
    root = btad_tree(tmp_path)
    assert detect_layout(root) == "btad"
    layout, df = list_inputs(root, DataSpec())
    assert layout == "btad" and list(df["gt_label"]) == [1, 1, 1, 1, 0, 1, 0]
    single = os.path.join(root, "01")
    assert detect_layout(single) == "btad"
    _, one = list_inputs(single, DataSpec())
    assert set(one["category"]) == {"01"} and list(one["gt_label"]) == [1, 1, 1, 1, 0]


def test_btad_category_filter(tmp_path):
    root = btad_tree(tmp_path)
    _, df = list_inputs(root, DataSpec(layout="btad", category="03"))
    assert set(df["category"]) == {"03"} and len(df) == 2
    with pytest.raises(InputError, match=r"'02' not found"):
        list_inputs(root, DataSpec(layout="btad", category="02"))


def test_btad_on_plain_folder_errors(tmp_path):
    touch(tmp_path, "a/x.png")
    with pytest.raises(InputError, match=r"does not look like a BTAD tree"):
        list_inputs(str(tmp_path), DataSpec(layout="btad"))


def test_auto_detection_keeps_mvtec_and_folder(tmp_path):
    touch(tmp_path, "mv/bottle/test/good/000.png", "mv/bottle/test/broken/000.png", "plain/a/x.png")
    assert detect_layout(str(tmp_path / "mv")) == "mvtec"
    assert detect_layout(str(tmp_path / "plain")) == "folder"


def test_new_layout_names_accepted_by_spec_and_cli():
    from pipeline.io.layouts import LAYOUTS

    for name in ("visa", "visa_1cls", "mpdd", "btad"):
        assert DataSpec(layout=name).layout == name
        assert name in LAYOUTS
