"""pipeline.io.manifest: user manifests (layout ``manifest``), the inputs table contract, reading back."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataSpec
from pipeline.io import contracts
from pipeline.io.layouts import InputError, list_inputs
from pipeline.io.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest

# --------------------------------------------------------------------------------------------
# User manifests
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
    assert set(by) == {
        "lists/imgs/a.png",
        "lists/imgs/b.png",
        "c.png",
        "elsewhere/z.png",
        "lists/imgs/d.png",
        "lists/imgs/e.png",
    }
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
# The inputs table
# --------------------------------------------------------------------------------------------


def test_arrow_schema_matches_inputs_contract():
    yaml = pytest.importorskip("yaml")
    contract_path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "schemas", "inputs.yaml")
    with open(contract_path, encoding="utf-8") as fh:
        contract = yaml.safe_load(fh)
    schema = contracts.load("inputs").schema
    assert [f["name"] for f in contract["fields"]] == list(MANIFEST_COLUMNS) == schema.names
    for field in contract["fields"]:
        assert str(schema.field(field["name"]).type) == field["type"], field["name"]
        assert schema.field(field["name"]).nullable == field["nullable"], field["name"]
    assert schema.metadata[b"zsad.table"] == contract["table"].encode()
    assert schema.metadata[b"zsad.schema_version"] == str(contract["version"]).encode()


def test_write_manifest_rejects_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="etag"):
        write_manifest(pd.DataFrame({"uri": ["a"]}), str(tmp_path / "m.parquet"))


def test_read_manifest_gives_back_what_was_written(tmp_path):
    (tmp_path / "m.csv").write_text("uri,category,label,mask_uri\na.png,x,1,m/a.png\nb.png,x,,\n")
    _, df = list_inputs(str(tmp_path / "m.csv"), DataSpec())
    out = str(tmp_path / "run" / "inputs.parquet")
    write_manifest(df, out)
    back = read_manifest(out)
    assert tuple(back.columns) == MANIFEST_COLUMNS
    assert str(back["gt_label"].dtype) == "Int64"
    for column in ("uri", "image_id", "category", "gt_label"):
        assert back[column].tolist() == df[column].tolist(), column
    assert back["mask_uri"][0] == df["mask_uri"][0] and pd.isna(back["mask_uri"][1])
