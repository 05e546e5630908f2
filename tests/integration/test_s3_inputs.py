"""Listing inputs on a real S3 API (moto's standalone server on loopback)."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataSpec, StorageSpec
from pipeline.io.fs import filesystem, storage_options
from pipeline.io.layouts import InputError, list_inputs
from pipeline.io.manifest import write_manifest
from pipeline.synthetic import make_dataset

pytestmark = pytest.mark.integration


def _put(bucket, objects):
    fs, _ = filesystem(f"s3://{bucket}", storage_options())
    fs.pipe({f"{bucket}/{key}": data for key, data in objects.items()})


def test_folder_listing_on_s3(s3_bucket):
    objects = {
        "photos/cats/a.png": b"aaaa",
        "photos/cats/B.JPG": b"bb",
        "photos/top.png": b"t",
        "photos/.hidden/x.png": b"h",
        "photos/cats/notes.txt": b"n",
        "photos2/other.png": b"o",  # a sibling prefix must not leak in
    }
    _put(s3_bucket, objects)
    layout, df = list_inputs(f"s3://{s3_bucket}/photos/", DataSpec(), storage_options())
    assert layout == "folder"
    assert df["uri"].tolist() == [
        f"s3://{s3_bucket}/photos/cats/B.JPG",
        f"s3://{s3_bucket}/photos/cats/a.png",
        f"s3://{s3_bucket}/photos/top.png",
    ]
    assert df["category"].tolist() == ["cats", "cats", "photos"]
    assert df["size"].tolist() == [2, 4, 1]
    assert df["etag"].tolist() == [
        hashlib.md5(objects["photos/cats/B.JPG"]).hexdigest(),
        hashlib.md5(objects["photos/cats/a.png"]).hexdigest(),
        hashlib.md5(objects["photos/top.png"]).hexdigest(),
    ]
    assert df["mtime"].notna().all() and (df["mtime"] > 1e9).all()
    assert df["gt_label"].isna().all()


def test_make_dataset_to_s3_then_mvtec_listing(s3_bucket):
    root = f"s3://{s3_bucket}/mvtec"
    summary = make_dataset(root, n_good=2, n_bad=2, n_train=1, size=32, storage=storage_options())
    assert summary["root"] == root and summary["n_files"] == 14
    layout, df = list_inputs(root, DataSpec(), storage_options())
    assert layout == "mvtec"
    assert len(df) == 8
    assert all(u.startswith(f"{root}/") for u in df["uri"])
    assert df["etag"].notna().all() and not df["etag"].str.contains('"').any()
    anomalous = df[df["gt_label"] == 1]
    assert len(anomalous) == 4
    assert anomalous["mask_uri"].tolist() == [
        u.replace("/test/", "/ground_truth/").replace(".png", "_mask.png") for u in anomalous["uri"]
    ]
    # one category folder on S3
    layout, one = list_inputs(f"{root}/tile", DataSpec(layout="mvtec"), storage_options())
    assert set(one["category"]) == {"tile"} and len(one) == 4


def test_manifest_on_s3_with_relative_uris(s3_bucket):
    buffer = io.BytesIO()
    pq.write_table(
        pa.table({"uri": ["img/a.png", "../b.png"], "category": ["x", "y"], "label": ["ok", "bad"]}), buffer
    )
    _put(
        s3_bucket,
        {
            "lists/in.csv": b"uri,category,label,mask_uri\nimg/a.png,x,normal,\nimg/c.png,x,anomaly,gt/c.png\n",
            "lists/in.parquet": buffer.getvalue(),
        },
    )
    layout, df = list_inputs(f"s3://{s3_bucket}/lists/in.csv", DataSpec(), storage_options())
    assert layout == "manifest"
    assert df["uri"].tolist() == [f"s3://{s3_bucket}/lists/img/a.png", f"s3://{s3_bucket}/lists/img/c.png"]
    assert df["gt_label"].tolist() == [0, 1]
    assert df["mask_uri"].tolist() == [None, f"s3://{s3_bucket}/lists/gt/c.png"]

    _, df = list_inputs(f"s3://{s3_bucket}/lists/in.parquet", DataSpec(), storage_options())
    assert df["uri"].tolist() == [f"s3://{s3_bucket}/b.png", f"s3://{s3_bucket}/lists/img/a.png"]
    assert df["gt_label"].tolist() == [1, 0]


def test_write_manifest_to_s3(s3_bucket):
    make_dataset(f"s3://{s3_bucket}/d", categories=("widget",), n_good=1, n_bad=1, n_train=0, size=32,
                 storage=storage_options())
    _, df = list_inputs(f"s3://{s3_bucket}/d", DataSpec(), storage_options())
    target = f"s3://{s3_bucket}/runs/r1/input_manifest.parquet"
    write_manifest(df, target, storage_options())
    _, back = list_inputs(target, DataSpec(), storage_options())
    assert back["uri"].tolist() == df["uri"].tolist()
    assert back["gt_label"].tolist() == [0, 1]


def test_nonexistent_bucket_error(s3_env):
    with pytest.raises(InputError) as err:
        list_inputs("s3://zsad-no-such-bucket/prefix", DataSpec(), storage_options())
    msg = str(err.value)
    assert "s3://zsad-no-such-bucket/prefix" in msg and "bucket" in msg and "does not exist" in msg


def test_nonexistent_prefix_error(s3_bucket):
    _put(s3_bucket, {"real/a.png": b"a"})
    with pytest.raises(InputError) as err:
        list_inputs(f"s3://{s3_bucket}/nothing-here", DataSpec(), storage_options())
    assert f"s3://{s3_bucket}/nothing-here" in str(err.value) and "no such" in str(err.value)


def test_missing_manifest_object_error(s3_bucket):
    with pytest.raises(InputError, match="absent.csv.*no such"):
        list_inputs(f"s3://{s3_bucket}/absent.csv", DataSpec(), storage_options())


def test_unreachable_endpoint_error(s3_env):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opts = storage_options(StorageSpec(endpoint_url=f"http://127.0.0.1:{port}"))
    opts["config_kwargs"] = {"retries": {"max_attempts": 1}}
    with pytest.raises(InputError) as err:
        list_inputs("s3://some-bucket/prefix", DataSpec(), opts)
    assert "cannot reach endpoint" in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
