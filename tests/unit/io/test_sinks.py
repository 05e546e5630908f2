"""ShardSink: rows stream into a shard's files, which appear only when the shard finishes."""

import pandas as pd
import pyarrow.parquet as pq

from pipeline.io.sinks import ShardSink


def _errors(ids):
    return {"run_id": ["r"] * len(ids), "image_id": ids, "uri": [f"/x/{i}" for i in ids], "category": ["c"] * len(ids),
            "stage": ["decode"] * len(ids), "error_type": ["EmptyFile"] * len(ids), "message": ["empty"] * len(ids)}


def test_streamed_shard_appears_whole_at_finish(tmp_path):
    sink = ShardSink(str(tmp_path / "run"), ["errors"])
    sink.append(0, {"errors": _errors(["a", "b"])})
    sink.append(0, {"errors": _errors(["c"])})
    assert sink.files("errors") == [] and sink.markers() == {}  # nothing visible yet
    sink.finish(0, {"images": 3})
    assert [f.rsplit("/", 1)[1] for f in sink.files("errors")] == ["shard-00000.parquet"]
    table = pq.read_table(sink.files("errors")[0])
    assert table.column("image_id").to_pylist() == ["a", "b", "c"]
    assert table.schema.metadata[b"zsad.table"] == b"errors"
    assert sink.markers() == {0: {"shard": 0, "images": 3}}
    assert not list((tmp_path / "run" / "errors").glob(".*"))  # no temporary file left


def test_unfinished_shards_are_discarded_and_rewritten(tmp_path):
    sink = ShardSink(str(tmp_path / "run"), ["errors"])
    sink.append(1, {"errors": _errors(["a"])})
    sink.discard()
    assert sink.files("errors") == [] and not list((tmp_path / "run" / "errors").glob(".*"))
    again = ShardSink(str(tmp_path / "run"), ["errors"])
    again.append(1, {"errors": _errors(["a", "b"])})
    again.finish(1, {"images": 2})
    assert pd.read_parquet(tmp_path / "run" / "errors")["image_id"].tolist() == ["a", "b"]


def test_a_shard_without_rows_gets_an_empty_file_with_the_schema(tmp_path):
    sink = ShardSink(str(tmp_path / "run"), ["errors"])
    sink.finish(2, {"images": 0})
    table = pq.read_table(sink.files("errors")[0])
    assert table.num_rows == 0 and "image_id" in table.schema.names


def _unraisable(monkeypatch) -> list:
    """What finalisers raise (fsspec prints these as "Exception ignored in ... Traceback")."""
    import sys

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info))
    return seen


def test_a_store_that_went_away_leaves_no_file_for_garbage_collection_to_upload(monkeypatch):
    """The object store stops answering while a shard is finished: the shard's other files are let go
    of as well, so nothing tries to upload them later (that printed fsspec tracebacks at exit)."""
    import gc

    import pytest

    from tests.helpers.moto import free_port

    seen = _unraisable(monkeypatch)
    storage = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    sink = ShardSink("s3://gone/run", ["errors", "scores"], storage)
    sink.append(0, {"errors": _errors(["a"])})
    sink.append(1, {"errors": _errors(["b"])})
    with pytest.raises(Exception):
        sink.finish(0, {"images": 1})
    sink.discard()  # shard 1: never published
    gc.collect()
    assert seen == []


def test_a_discarded_shard_is_not_published_to_object_storage(s3_bucket, s3_env):
    storage = {
        "endpoint_url": s3_env["endpoint_url"],
        "key": s3_env["access_key_id"],
        "secret": s3_env["secret_access_key"],
    }
    sink = ShardSink(f"s3://{s3_bucket}/run", ["errors"], storage)
    sink.append(3, {"errors": _errors(["a", "b"])})
    sink.finish(4, {"images": 0})
    sink.append(5, {"errors": _errors(["c"])})
    sink.discard()
    assert [f.rsplit("/", 1)[1] for f in sink.files("errors")] == ["shard-00004.parquet"]
    assert set(sink.markers()) == {4}
