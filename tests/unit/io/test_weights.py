"""Weights specs: parsing, the random-weights gate, local and S3 checkpoints through the real path."""

import hashlib
import threading

import numpy as np
import pytest
import torch

from pipeline.config import ClipSpec, WeightsSpec, WinclipImageScore
from pipeline.io import fs as fsio
from pipeline.io.weights import WeightsError, fetch, resolve
from pipeline.models import clip as clip_models
from pipeline.stages.clip_score import ClipScoreStage


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


def _random_checkpoint(path):
    """A random tiny state dict that differs from the seeded random init."""
    model, _ = clip_models.build_clip("zsad-tiny")
    g = torch.Generator().manual_seed(42)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(sd, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scores(weights, cache):
    rng = np.random.default_rng(5)
    imgs = np.empty(2, dtype=object)
    imgs[:] = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    batch = {
        "category": np.array(["widget", "widget"], dtype=object), "image": imgs,
        "status": np.array(["ok", "ok"], dtype=object), "error_stage": np.array([None, None], dtype=object),
        "error_type": np.array([None, None], dtype=object), "error_message": np.array([None, None], dtype=object),
    }
    stage = ClipScoreStage(ClipSpec(model="zsad-tiny", weights=weights), WinclipImageScore(), weights_cache=str(cache),
                           storage=fsio.storage_options())
    return stage(batch)["score"]


def test_local_and_s3_checkpoints_give_identical_scores(tmp_path, s3_bucket):
    ckpt = tmp_path / "tiny.pt"
    digest = _random_checkpoint(ckpt)
    fs, _ = fsio.filesystem(f"s3://{s3_bucket}/models/tiny.pt", fsio.storage_options())
    fs.put_file(str(ckpt), f"{s3_bucket}/models/tiny.pt")

    local = _scores({"path": str(ckpt), "sha256": digest}, tmp_path / "cache")
    remote = _scores({"uri": f"s3://{s3_bucket}/models/tiny.pt", "sha256": digest}, tmp_path / "cache")
    random_init = _scores(None, tmp_path / "cache")
    np.testing.assert_array_equal(local, remote)
    assert not np.allclose(local, random_init)  # the checkpoint really was loaded
    cached = list((tmp_path / "cache").rglob("tiny.pt"))
    assert len(cached) == 1 and hashlib.sha256(cached[0].read_bytes()).hexdigest() == digest


def test_sha256_mismatch_fails_and_leaves_no_file(tmp_path, s3_bucket):
    ckpt = tmp_path / "tiny.pt"
    _random_checkpoint(ckpt)
    fs, _ = fsio.filesystem(f"s3://{s3_bucket}/tiny.pt", fsio.storage_options())
    fs.put_file(str(ckpt), f"{s3_bucket}/tiny.pt")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        resolve(WeightsSpec(uri=f"s3://{s3_bucket}/tiny.pt", sha256="ab" * 32), str(tmp_path / "c"), fsio.storage_options())
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
    threads = [threading.Thread(target=lambda: paths.append(fetch(f"s3://{s3_bucket}/blob.bin", str(tmp_path), None, fsio.storage_options()))) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(paths)) == 1 and open(paths[0], "rb").read() == data
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".part-")]
    assert not leftovers
