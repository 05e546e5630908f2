"""pipeline.io.fs: storage option resolution and URI helpers."""

from __future__ import annotations

import os

import pytest

from pipeline.config import StorageSpec
from pipeline.io.fs import StorageError, filesystem, is_remote, join, normalise, storage_options, unstrip

ENV = {
    "AWS_ENDPOINT_URL": "http://env-endpoint:9000",
    "AWS_ACCESS_KEY_ID": "env-key",
    "AWS_SECRET_ACCESS_KEY": "env-secret",
    "AWS_DEFAULT_REGION": "eu-west-1",
}


def test_storage_options_from_env_only():
    opts = storage_options(StorageSpec(), env=ENV)
    assert opts == {
        "endpoint_url": "http://env-endpoint:9000",
        "key": "env-key",
        "secret": "env-secret",
        "client_kwargs": {"region_name": "eu-west-1"},
    }


def test_storage_options_spec_wins_over_env():
    spec = StorageSpec(
        endpoint_url="http://spec-endpoint:1234",
        access_key_id="spec-key",
        secret_access_key="spec-secret",
        region="ap-south-1",
    )
    opts = storage_options(spec, env=ENV)
    assert opts["endpoint_url"] == "http://spec-endpoint:1234"
    assert opts["key"] == "spec-key"
    assert opts["secret"] == "spec-secret"
    assert opts["client_kwargs"] == {"region_name": "ap-south-1"}


def test_storage_options_partial_spec_falls_back_per_field():
    opts = storage_options(StorageSpec(region="us-west-2"), env=ENV)
    assert opts["client_kwargs"] == {"region_name": "us-west-2"}
    assert opts["endpoint_url"] == "http://env-endpoint:9000"
    assert (opts["key"], opts["secret"]) == ("env-key", "env-secret")


def test_storage_options_s3_specific_endpoint_beats_generic():
    env = dict(ENV, AWS_ENDPOINT_URL_S3="http://s3-only:9000")
    assert storage_options(StorageSpec(), env=env)["endpoint_url"] == "http://s3-only:9000"


def test_storage_options_empty_env_gives_no_options():
    assert storage_options(StorageSpec(), env={}) == {}


def test_storage_options_anon_drops_credentials():
    opts = storage_options(StorageSpec(anon=True), env=ENV)
    assert opts["anon"] is True
    assert "key" not in opts and "secret" not in opts


def test_storage_options_key_without_secret_is_not_passed():
    opts = storage_options(StorageSpec(access_key_id="only-key"), env={})
    assert "key" not in opts and "secret" not in opts


def test_filesystem_local_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = filesystem("sub/a.png")
    assert path == os.path.join(str(tmp_path), "sub", "a.png")
    assert "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    assert unstrip(fs, path) == path


def test_filesystem_file_scheme_is_local(tmp_path):
    _, path = filesystem(f"file://{tmp_path}/x.png")
    assert path == f"{tmp_path}/x.png"


def test_filesystem_unknown_scheme_raises_storage_error():
    with pytest.raises(StorageError, match="nosuchscheme://b/k"):
        filesystem("nosuchscheme://b/k")


def test_uri_helpers():
    assert is_remote("s3://b/k") and not is_remote("/tmp/x") and not is_remote("file:///tmp/x")
    assert normalise("s3://b/k/") == "s3://b/k"
    assert normalise("file:///tmp/a/../b") == "/tmp/b"
    assert join("s3://b/k/", "x", "y.png") == "s3://b/k/x/y.png"
    assert join("/tmp/a", "y.png") == "/tmp/a/y.png"


def test_a_path_that_is_not_utf8_becomes_a_file_uri_that_round_trips(tmp_path):
    """Issue 11, defect 1: names the file system gives as surrogate-escaped text are stored as
    percent-encoded file:// URIs (valid UTF-8 in Parquet) that open the same file."""
    import os

    from pipeline.io.fs import local_path, path_uri, read_bytes

    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9", b"a\xff b%41.png")
    os.makedirs(os.path.dirname(raw))
    with open(raw, "wb") as fh:
        fh.write(b"payload")
    path = os.fsdecode(raw)
    uri = path_uri(path)
    uri.encode("utf-8")  # storable
    assert uri.startswith("file://") and "caf%E9/a%FF%20b%2541.png" in uri
    assert local_path(uri) == path and read_bytes(uri) == b"payload"
    plain = str(tmp_path / "x%41 y.png")  # valid UTF-8: stored as it is, "%" untouched
    assert path_uri(plain) == plain and local_path(plain) == plain


def test_a_folder_name_that_is_not_utf8_is_a_readable_category(tmp_path):
    import os

    from pipeline.config import DataSpec
    from pipeline.io.layouts import list_inputs
    from tests.helpers.badfiles import write_good_images

    write_good_images(tmp_path / "in" / "plain", 1)
    bad = os.path.join(os.fsencode(tmp_path / "in"), b"caf\xe9")
    os.rename(os.fsencode(tmp_path / "in" / "plain"), bad)
    _, df = list_inputs(str(tmp_path / "in"), DataSpec(layout="folder"))
    assert df["category"].tolist() == ["caf\\xe9"] and df["uri"].str.startswith("file://").all()
