"""pipeline.io.layouts on small trees written to local disk."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataSpec
from pipeline.io.layouts import (
    MANIFEST_COLUMNS,
    InputError,
    detect_layout,
    image_id_for,
    list_inputs,
    manifest_arrow_schema,
    write_manifest,
)
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
# manifest
# --------------------------------------------------------------------------------------------


def test_manifest_csv_relative_uris_and_label_words(tmp_path):
    other = tmp_path / "elsewhere" / "z.png"
    (tmp_path / "lists").mkdir()
    csv = tmp_path / "lists" / "inputs.csv"
    csv.write_text(
        "uri,category,label,mask_uri\n"
        "imgs/a.png,screw,good,\n"
        "imgs/b.png,screw,Anomalous,masks/b.png\n"
        "../c.png,nut,1,\n"
        f"{other},nut,,\n"
        "imgs/d.png,nut,defect,\n"
        "imgs/e.png,nut,OK,\n"
    )
    layout, df = list_inputs(str(csv), DataSpec())
    assert layout == "manifest"
    by = {os.path.relpath(u, tmp_path): r for u, r in zip(df["uri"], df.to_dict("records"))}
    assert set(by) == {"lists/imgs/a.png", "lists/imgs/b.png", "c.png", "elsewhere/z.png", "lists/imgs/d.png", "lists/imgs/e.png"}
    assert by["lists/imgs/a.png"]["gt_label"] == 0
    assert by["lists/imgs/b.png"]["gt_label"] == 1
    assert by["lists/imgs/b.png"]["mask_uri"] == str(tmp_path / "lists" / "masks" / "b.png")
    assert by["c.png"]["gt_label"] == 1 and by["c.png"]["category"] == "nut"
    assert pd.isna(by["elsewhere/z.png"]["gt_label"])
    assert by["lists/imgs/d.png"]["gt_label"] == 1
    assert by["lists/imgs/e.png"]["gt_label"] == 0
    assert by["lists/imgs/a.png"]["mask_uri"] is None
    assert df["size"].isna().all() and df["mtime"].isna().all() and df["etag"].isna().all()
    assert df["uri"].tolist() == sorted(df["uri"].tolist())
    assert tuple(df.columns) == MANIFEST_COLUMNS


def test_manifest_parquet_ints_bools_and_nulls(tmp_path):
    table = pa.table(
        {
            "uri": ["x/1.png", "x/2.png", "x/3.png", "x/4.png"],
            "category": ["a", "a", "b", "b"],
            "label": pa.array([1, 0, None, 1], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    _, df = list_inputs(str(tmp_path / "m.parquet"), DataSpec(layout="manifest"))
    assert df["gt_label"].tolist()[:2] == [1, 0]
    assert pd.isna(df["gt_label"][2]) and df["gt_label"][3] == 1
    assert df["uri"][0] == str(tmp_path / "x" / "1.png")

    pq.write_table(
        pa.table({"uri": ["p.png", "q.png"], "category": ["c", "c"], "label": [True, False]}), tmp_path / "b.pq"
    )
    _, df = list_inputs(str(tmp_path / "b.pq"), DataSpec())
    assert df["gt_label"].tolist() == [1, 0]


def test_manifest_missing_column_error_names_column_and_file(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("path,category\na.png,x\n")
    with pytest.raises(InputError) as err:
        list_inputs(str(csv), DataSpec())
    assert "uri" in str(err.value) and str(csv) in str(err.value) and "category" not in str(err.value).split("(has")[0]


def test_manifest_bad_label_error_names_row_and_value(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("uri,category,label\na.png,x,0\nb.png,x,maybe\n")
    with pytest.raises(InputError) as err:
        list_inputs(str(csv), DataSpec())
    msg = str(err.value)
    assert "row 2" in msg and "'maybe'" in msg and str(csv) in msg

    pq.write_table(pa.table({"uri": ["a.png"], "category": ["x"], "label": [7]}), tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"row 1.*7"):
        list_inputs(str(tmp_path / "n.parquet"), DataSpec())


def test_manifest_duplicate_uri_and_empty_errors(tmp_path):
    csv = tmp_path / "dup.csv"
    csv.write_text("uri,category\na.png,x\n./a.png,x\n")
    with pytest.raises(InputError, match="duplicate"):
        list_inputs(str(csv), DataSpec())
    empty = tmp_path / "empty.csv"
    empty.write_text("uri,category\n")
    with pytest.raises(InputError, match="no images"):
        list_inputs(str(empty), DataSpec())


def test_manifest_missing_file_error(tmp_path):
    with pytest.raises(InputError) as err:
        list_inputs(str(tmp_path / "absent.csv"), DataSpec())
    assert "absent.csv" in str(err.value) and "no such" in str(err.value)


def test_manifest_category_filter(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("uri,category\na.png,x\nb.png,y\n")
    _, df = list_inputs(str(csv), DataSpec(category="y"))
    assert df["category"].tolist() == ["y"] and df["uri"][0].endswith("b.png")
    with pytest.raises(InputError, match="available: x, y"):
        list_inputs(str(csv), DataSpec(category="z"))


# --------------------------------------------------------------------------------------------
# write_manifest
# --------------------------------------------------------------------------------------------


def test_write_manifest_roundtrip_and_relist(tmp_path):
    root = mvtec_tree(tmp_path / "data")
    _, df = list_inputs(root, DataSpec())
    out = str(tmp_path / "out" / "nested" / "manifest.parquet")
    write_manifest(df, out, None)
    table = pq.read_table(out)
    assert table.schema.equals(manifest_arrow_schema(), check_metadata=False)
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


def test_arrow_schema_matches_inputs_contract():
    yaml = pytest.importorskip("yaml")
    contract_path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "schemas", "inputs.yaml")
    with open(contract_path, encoding="utf-8") as fh:
        contract = yaml.safe_load(fh)
    schema = manifest_arrow_schema()
    assert [f["name"] for f in contract["fields"]] == list(MANIFEST_COLUMNS) == schema.names
    for field in contract["fields"]:
        assert str(schema.field(field["name"]).type) == field["type"], field["name"]
        assert schema.field(field["name"]).nullable == field["nullable"], field["name"]
    assert schema.metadata[b"zsad.table"] == contract["table"].encode()
    assert schema.metadata[b"zsad.schema_version"] == str(contract["version"]).encode()


def test_write_manifest_rejects_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="etag"):
        write_manifest(pd.DataFrame({"uri": ["a"]}), str(tmp_path / "m.parquet"))
