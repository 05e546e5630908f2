"""Weights specs: parsing, the random-weights gate, local and S3 checkpoints through the real path."""

import hashlib
import threading

import numpy as np
import pytest

from pipeline.config import WeightsSpec
from pipeline.io import fs as fsio
from pipeline.io.weights import WeightsError, fetch, resolve
from tests.helpers.clip_weights import random_clip_checkpoint, tiny_clip_scores


@pytest.mark.parametrize(
    "text,field",
    [("laion400m_e31", "tag"), ("/models/clip.pt", "path"), ("weights.pth", "path"),
     ("s3://bucket/clip.pt", "uri"), ("https://example.org/clip.bin", "uri")],
)
def test_weights_spec_from_string(text, field):
    spec = WeightsSpec.model_validate(text)
    assert getattr(spec, field) == text


def test_weights_spec_rejects_ambiguity():
    with pytest.raises(ValueError, match="exactly one"):
        WeightsSpec(tag="a", path="/b")
    with pytest.raises(ValueError, match="sha256"):
        WeightsSpec(tag="a", sha256="0" * 64)


def test_local_and_s3_checkpoints_give_identical_scores(tmp_path, s3_bucket):
    ckpt = tmp_path / "tiny.pt"
    digest = random_clip_checkpoint(ckpt)
    fs, _ = fsio.filesystem(f"s3://{s3_bucket}/models/tiny.pt", fsio.storage_options())
    fs.put_file(str(ckpt), f"{s3_bucket}/models/tiny.pt")

    local = tiny_clip_scores({"path": str(ckpt), "sha256": digest}, tmp_path / "cache")
    remote = tiny_clip_scores({"uri": f"s3://{s3_bucket}/models/tiny.pt", "sha256": digest}, tmp_path / "cache")
    random_init = tiny_clip_scores(None, tmp_path / "cache")
    np.testing.assert_array_equal(local, remote)
    assert not np.allclose(local, random_init)  # the checkpoint really was loaded
    cached = list((tmp_path / "cache").rglob("tiny.pt"))
    assert len(cached) == 1 and hashlib.sha256(cached[0].read_bytes()).hexdigest() == digest


def test_sha256_mismatch_fails_and_leaves_no_file(tmp_path, s3_bucket):
    ckpt = tmp_path / "tiny.pt"
    random_clip_checkpoint(ckpt)
    fs, _ = fsio.filesystem(f"s3://{s3_bucket}/tiny.pt", fsio.storage_options())
    fs.put_file(str(ckpt), f"{s3_bucket}/tiny.pt")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(
            WeightsSpec(uri=f"s3://{s3_bucket}/tiny.pt", sha256="ab" * 32), str(tmp_path / "c"), fsio.storage_options()
        )
    assert not list((tmp_path / "c").rglob("tiny.pt"))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(WeightsSpec(path=str(ckpt), sha256="ab" * 32))
    with pytest.raises(WeightsError, match="no such object"):
        resolve(WeightsSpec(uri=f"s3://{s3_bucket}/missing.pt"), str(tmp_path / "c"), fsio.storage_options())
    with pytest.raises(WeightsError, match="does not exist"):
        resolve(WeightsSpec(path=str(tmp_path / "nope.pt")))


def test_concurrent_fetches_download_once(tmp_path, s3_bucket):
    data = b"x" * 100_000
    fs, _ = fsio.filesystem(f"s3://{s3_bucket}/blob.bin", fsio.storage_options())
    fs.pipe_file(f"{s3_bucket}/blob.bin", data)
    paths = []
    threads = [
        threading.Thread(
            target=lambda: paths.append(
                fetch(f"s3://{s3_bucket}/blob.bin", str(tmp_path), None, fsio.storage_options())
            )
        )
        for _ in range(4)
    ]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(paths)) == 1 and open(paths[0], "rb").read() == data
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith((".part-", ".tmp-"))]
    assert not leftovers
