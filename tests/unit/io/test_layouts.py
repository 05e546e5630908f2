"""pipeline.io.layouts on small trees written to local disk."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataSpec
from pipeline.io import contracts
from pipeline.io.layouts import InputError, detect_layout, list_inputs
from pipeline.io.manifest import MANIFEST_COLUMNS, image_id_for, write_manifest
from tests.helpers.files import touch


def mvtec_tree(root):
    """Two categories: bottle (with masks, one anomalous image without a mask) and cable."""
    touch(
        root,
        "bottle/train/good/000.png",
        "bottle/test/good/000.png",
        "bottle/test/good/001.png",
        "bottle/test/broken_large/000.png",
        "bottle/test/broken_large/001.png",
        "bottle/test/contamination/000.png",
        "bottle/ground_truth/broken_large/000_mask.png",
        "bottle/ground_truth/broken_large/001_mask.png",
        # contamination/000 has no mask on purpose
        "bottle/license.txt",
        "cable/train/good/000.png",
        "cable/test/good/000.png",
        "cable/test/cut/000.png",
        "cable/ground_truth/cut/000_mask.png",
    )
    return str(root)


# --------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------


def test_folder_categories_hidden_and_extensions(tmp_path):
    root = tmp_path / "photos"
    touch(
        root,
        "cats/b.png",
        "cats/a.PNG",
        "cats/deep/c.Jpg",
        "dogs/x.jpeg",
        "top.bmp",
        "notes.txt",
        "cats/.hidden.png",
        ".cache/z.png",
        "dogs/.thumbs/y.png",
    )
    layout, df = list_inputs(str(root), DataSpec(layout="folder"))
    assert layout == "folder"
    rel = [os.path.relpath(u, root) for u in df["uri"]]
    assert rel == ["cats/a.PNG", "cats/b.png", "cats/deep/c.Jpg", "dogs/x.jpeg", "top.bmp"]
    assert df["category"].tolist() == ["cats", "cats", "cats", "dogs", "photos"]
    assert df["gt_label"].isna().all()
    assert df["mask_uri"].isna().all()
    assert df["etag"].isna().all()
    assert all(os.path.isabs(u) for u in df["uri"])


def test_folder_extension_filter_uses_spec(tmp_path):
    touch(tmp_path, "a/1.png", "a/2.TIF", "a/3.jpg")
    _, df = list_inputs(str(tmp_path), DataSpec(layout="folder", extensions=(".tif",)))
    assert [os.path.basename(u) for u in df["uri"]] == ["2.TIF"]


def test_folder_forced_category(tmp_path):
    touch(tmp_path, "a/1.png", "b/2.png", "3.png")
    _, df = list_inputs(str(tmp_path), DataSpec(layout="folder", category="screws"))
    assert df["category"].tolist() == ["screws"] * 3


def test_manifest_contract_columns_dtypes_stats_and_ids(tmp_path):
    touch(tmp_path, "a/1.png", data=b"12345")
    touch(tmp_path, "a/0.png", data=b"12")
    _, df = list_inputs(str(tmp_path), DataSpec())
    assert tuple(df.columns) == MANIFEST_COLUMNS
    assert str(df["gt_label"].dtype) == "Int64"
    assert str(df["size"].dtype) == "Int64"
    assert str(df["mtime"].dtype) == "Float64"
    assert df["uri"].tolist() == sorted(df["uri"].tolist())
    assert df["size"].tolist() == [2, 5]
    first = df["uri"][0]
    assert df["mtime"][0] == pytest.approx(os.stat(first).st_mtime)
    assert df["image_id"][0] == hashlib.sha1(first.encode()).hexdigest()[:16]
    assert image_id_for(first) == df["image_id"][0]
    _, again = list_inputs(str(tmp_path), DataSpec())
    assert again["image_id"].tolist() == df["image_id"].tolist()
    assert df["image_id"].nunique() == 2


def test_max_images_keeps_first_after_sort(tmp_path):
    touch(tmp_path, "c/3.png", "a/1.png", "b/2.png", "a/0.png")
    _, df = list_inputs(str(tmp_path), DataSpec(max_images=2))
    assert [os.path.relpath(u, tmp_path) for u in df["uri"]] == ["a/0.png", "a/1.png"]
    assert df.index.tolist() == [0, 1]


def test_empty_folder_error_names_extensions(tmp_path):
    touch(tmp_path, "readme.txt", ".hidden.png")
    with pytest.raises(InputError) as err:
        list_inputs(str(tmp_path), DataSpec(layout="folder", extensions=(".png", ".jpg")))
    msg = str(err.value)
    assert str(tmp_path) in msg and "no images" in msg and ".png" in msg and ".jpg" in msg


def test_really_empty_folder_error(tmp_path):
    with pytest.raises(InputError, match="no images"):
        list_inputs(str(tmp_path), DataSpec())


def test_missing_location_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(InputError) as err:
        list_inputs(missing, DataSpec())
    assert missing in str(err.value) and "no such" in str(err.value)
    with pytest.raises(InputError, match="no such"):
        detect_layout(missing)


def test_single_file_input_error(tmp_path):
    touch(tmp_path, "one.png")
    with pytest.raises(InputError, match="single file"):
        list_inputs(str(tmp_path / "one.png"), DataSpec())


# --------------------------------------------------------------------------------------------
# mvtec
# --------------------------------------------------------------------------------------------


def test_mvtec_root_labels_and_masks(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    layout, df = list_inputs(root, DataSpec(layout="mvtec"))
    assert layout == "mvtec"
    rows = {os.path.relpath(u, root): r for u, r in zip(df["uri"], df.to_dict("records"))}
    assert sorted(rows) == [
        "bottle/test/broken_large/000.png",
        "bottle/test/broken_large/001.png",
        "bottle/test/contamination/000.png",
        "bottle/test/good/000.png",
        "bottle/test/good/001.png",
        "cable/test/cut/000.png",
        "cable/test/good/000.png",
    ]
    assert rows["bottle/test/good/000.png"]["gt_label"] == 0
    assert rows["bottle/test/good/000.png"]["mask_uri"] is None
    assert rows["bottle/test/broken_large/001.png"]["gt_label"] == 1
    assert rows["bottle/test/broken_large/001.png"]["mask_uri"] == os.path.join(
        root, "bottle/ground_truth/broken_large/001_mask.png"
    )
    assert rows["bottle/test/contamination/000.png"]["gt_label"] == 1
    assert rows["bottle/test/contamination/000.png"]["mask_uri"] is None
    assert rows["cable/test/cut/000.png"]["category"] == "cable"
    assert rows["cable/test/cut/000.png"]["mask_uri"].endswith("cable/ground_truth/cut/000_mask.png")
    assert df["category"].value_counts().to_dict() == {"bottle": 5, "cable": 2}
    assert df["gt_label"].sum() == 4


def test_mvtec_category_filter_and_unknown_category(tmp_path):
    root = mvtec_tree(tmp_path)
    _, df = list_inputs(root, DataSpec(layout="mvtec", category="cable"))
    assert set(df["category"]) == {"cable"} and len(df) == 2
    with pytest.raises(InputError) as err:
        list_inputs(root, DataSpec(layout="mvtec", category="screw"))
    assert "screw" in str(err.value) and "bottle" in str(err.value) and "cable" in str(err.value)


def test_mvtec_single_category_folder(tmp_path):
    root = mvtec_tree(tmp_path)
    layout, df = list_inputs(os.path.join(root, "bottle"), DataSpec())
    assert layout == "mvtec"
    assert set(df["category"]) == {"bottle"} and len(df) == 5
    assert df["mask_uri"].notna().sum() == 2


def test_mvtec_visa_style_mask_without_suffix(tmp_path):
    touch(tmp_path, "pcb/test/good/a.JPG", "pcb/test/bad/b.JPG", "pcb/ground_truth/bad/b.png")
    _, df = list_inputs(str(tmp_path), DataSpec(layout="mvtec"))
    bad = df[df["gt_label"] == 1].iloc[0]
    assert bad["mask_uri"] == os.path.join(str(tmp_path), "pcb/ground_truth/bad/b.png")


def test_explicit_mvtec_on_plain_folder_errors(tmp_path):
    touch(tmp_path, "a/1.png", "b/2.png")
    with pytest.raises(InputError) as err:
        list_inputs(str(tmp_path), DataSpec(layout="mvtec"))
    assert str(tmp_path) in str(err.value) and "MVTec" in str(err.value)


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


def test_detect_layout(tmp_path):
    root = mvtec_tree(tmp_path / "m")
    assert detect_layout(root) == "mvtec"
    assert detect_layout(os.path.join(root, "cable")) == "mvtec"
    touch(tmp_path / "f", "x/1.png", "test/anything/2.png")  # test/ without good/ is not MVTec
    assert detect_layout(str(tmp_path / "f")) == "folder"
    for name in ("in.csv", "in.parquet", "in.pq", "IN.CSV"):
        assert detect_layout(str(tmp_path / name)) == "manifest"


def test_auto_layout_lists_like_explicit(tmp_path):
    root = mvtec_tree(tmp_path)
    layout, df = list_inputs(root, DataSpec(layout="auto"))
    _, explicit = list_inputs(root, DataSpec(layout="mvtec"))
    assert layout == "mvtec"
    pd.testing.assert_frame_equal(df, explicit)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_unknown_layout_error_lists_the_known_ones(tmp_path):
    touch(tmp_path, "a/1.png")
    spec = DataSpec.model_construct(**{**DataSpec().model_dump(), "layout": "zip"})  # past DataSpec's own check
    with pytest.raises(
        InputError, match=r"unknown layout 'zip' \(known: auto, folder, mvtec, manifest, visa, visa_1cls, mpdd, btad\)"
    ):
        list_inputs(str(tmp_path), spec)


# --------------------------------------------------------------------------------------------
# write_manifest (a listing written, then listed again as a manifest)
# --------------------------------------------------------------------------------------------


def test_write_manifest_roundtrip_and_relist(tmp_path):
    root = mvtec_tree(tmp_path / "data")
    _, df = list_inputs(root, DataSpec())
    out = str(tmp_path / "out" / "nested" / "manifest.parquet")
    write_manifest(df, out, None)
    table = pq.read_table(out)
    assert table.schema.equals(contracts.load("inputs").schema, check_metadata=False)
    assert table.schema.metadata[b"zsad.table"] == b"inputs"
    assert table.column("uri").to_pylist() == df["uri"].tolist()
    assert table.column("gt_label").to_pylist() == df["gt_label"].astype(int).tolist()
    assert table.column("mask_uri").to_pylist() == df["mask_uri"].tolist()
    assert table.column("etag").null_count == len(df)
    assert table.column("size").to_pylist() == [1] * len(df)
    # a written manifest is itself a valid manifest input (gt_label is accepted as the label column)
    layout, again = list_inputs(out, DataSpec())
    assert layout == "manifest"
    assert again["uri"].tolist() == df["uri"].tolist()
    assert again["gt_label"].tolist() == df["gt_label"].tolist()
    assert again["mask_uri"].tolist() == df["mask_uri"].tolist()
    assert again["image_id"].tolist() == df["image_id"].tolist()


def test_symlinks_are_followed_and_broken_ones_are_error_rows_and_skips_are_counted(tmp_path):
    """Issue 11, defects 2 and 3: links to files and folders are listed (with loop protection); a
    dangling or looping link is a row with its listing error; files left out are counted by reason."""
    import os

    from tests.helpers.badfiles import write_good_images

    root = tmp_path / "in" / "parts"
    write_good_images(root, 1)  # good_000.png
    os.symlink(root / "good_000.png", root / "link.png")
    shared = tmp_path / "elsewhere"
    write_good_images(shared, 3)
    os.symlink(shared, root / "linked_folder")
    os.symlink(root, root / "linked_folder_loop")  # a link back to an ancestor: its files are listed once
    os.symlink(tmp_path / "missing.png", root / "dangling.png")
    os.symlink(root / "self.png", root / "self.png")  # a link to itself: a loop
    (root / "anim.gif").write_bytes(b"GIF89a")
    (root / ".hidden.png").write_bytes(b"x")
    _, df = list_inputs(str(tmp_path / "in"), DataSpec(layout="folder"))
    rel = {os.path.relpath(u, tmp_path / "in"): r for u, r in zip(df["uri"], df.itertuples())}
    ok = {k for k, r in rel.items() if r.list_error_type is None}
    assert ok == {
        "parts/good_000.png",
        "parts/link.png",
        "parts/linked_folder/good_000.png",
        "parts/linked_folder/good_001.png",
        "parts/linked_folder/good_002.png",
    }
    assert rel["parts/dangling.png"].list_error_type == "BrokenLink"
    assert "missing.png" in rel["parts/dangling.png"].list_error_message
    assert rel["parts/self.png"].list_error_type == "LinkLoop"
    assert df.attrs["skipped"] == {"extension": 1, "hidden": 1, "link_loop_folder": 1}
