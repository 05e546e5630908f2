"""Retries of transient failures, against a real HTTP server on 127.0.0.1 that fails on purpose."""

import io

import aiohttp
import numpy as np
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from PIL import Image

from pipeline.config import ClipSpec, DecodeSpec, JobSpec, RetrySpec, ZeroShotImageScore
from pipeline.io import fs as fsio
from pipeline.io.retry import backoff_delays, is_transient, retrying
from pipeline.io.weights import WeightsError
from pipeline.stages.clip_score import ClipScoreStage
from pipeline.stages.decode import DecodeStage
from tests.helpers.clip_weights import random_clip_checkpoint, tiny_clip_scores
from tests.helpers.flaky_http import FlakyServer

FAST = RetrySpec(read=3, model_load=3, backoff_s=0.01, max_backoff_s=0.02)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


def _response_error(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(None, (), status=status, message="x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "exc, expected",
    [
        (ConnectionResetError(104, "reset"), True),
        (TimeoutError("slow"), True),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_response_error(503), True),
        (_response_error(429), True),
        (FileNotFoundError("s3://b/k"), False),
        (PermissionError("denied"), False),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchKey", 404), False),
        (_response_error(404), False),
        (ValueError("bad"), False),
    ],
)
def test_transient_classification(exc, expected):
    assert is_transient(exc) is expected


def test_cause_chain_counts_but_an_outer_permanent_error_wins():
    try:
        try:
            raise ConnectionResetError(104, "reset")
        except ConnectionResetError as inner:
            raise WeightsError("weights s3://b/m.pt: download failed") from inner
    except WeightsError as exc:
        assert is_transient(exc)
    try:
        try:
            raise ConnectionResetError(104, "reset")
        except ConnectionResetError:
            raise FileNotFoundError("gone")
    except FileNotFoundError as exc:
        assert not is_transient(exc)
    try:
        try:
            raise TimeoutError()
        except TimeoutError:
            raise WeightsError("sha256 mismatch") from None  # suppressed context is not a cause
    except WeightsError as exc:
        assert not is_transient(exc)


def test_backoff_doubles_and_is_capped():
    assert backoff_delays(5, 1.0, 5.0) == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff_delays(0, 1.0, 5.0) == []


def test_retrying_stops_at_the_budget_and_never_retries_permanent_errors():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        raise ConnectionResetError(104, "reset")

    with pytest.raises(ConnectionResetError) as info:
        retrying(flaky, retries=2, backoff_s=0.5, max_backoff_s=10, sleep=waits.append)
    assert len(calls) == 3 and waits == [0.5, 1.0] and info.value.zsad_attempts == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        retrying(missing, retries=5, sleep=waits.append)
    assert len(calls) == 1


def _decode(server, paths, retries):
    uris = np.array([f"{server.url}{p}" for p in paths], dtype=object)
    return DecodeStage(DecodeSpec(), retries=retries)({"uri": uris})


def test_decode_retries_transient_http_failures_then_succeeds():
    files = {"/a.png": _png(1), "/b.png": _png(2), "/c.png": _png(3)}
    failures = {"/a.png": [503, 503], "/b.png": ["reset"]}
    with FlakyServer(files, failures) as server:
        out = _decode(server, ["/a.png", "/b.png", "/c.png"], FAST)
        hits = dict(server.hits)
    assert list(out["status"]) == ["ok", "ok", "ok"]
    for i, path in enumerate(["/a.png", "/b.png", "/c.png"]):
        expected = np.asarray(Image.open(io.BytesIO(files[path])).convert("RGB"))
        np.testing.assert_array_equal(out["image"][i], expected)
    assert hits["/a.png"] >= 3 and hits["/b.png"] >= 2 and hits["/c.png"] >= 1


def test_decode_gives_up_after_the_budget_and_does_not_retry_missing_files():
    with FlakyServer({"/a.png": _png(1)}, {"/a.png": [503] * 10}) as server:
        out = _decode(server, ["/a.png", "/missing.png"], RetrySpec(read=1, backoff_s=0.01))
        hits = dict(server.hits)
    assert list(out["status"]) == ["error", "error"]
    assert "after 2 attempts" in out["error_message"][0] and "/a.png" in out["error_message"][0]
    assert out["error_type"][1] == "FileNotFoundError"
    assert hits["/missing.png"] == 1  # permanent: one request, no retries
    # no retries at all when the budget is 0
    with FlakyServer({"/a.png": _png(1)}, {"/a.png": [503]}) as server:
        out = _decode(server, ["/a.png"], RetrySpec(read=0))
    assert out["status"][0] == "error" and "after" not in out["error_message"][0]


def test_model_load_retries_a_flaky_weights_server(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    digest = random_clip_checkpoint(ckpt)
    data = ckpt.read_bytes()
    with FlakyServer({"/m/tiny.pt": data}, {"/m/tiny.pt": [503, "reset"]}) as server:
        spec = {"uri": f"{server.url}/m/tiny.pt", "sha256": digest}
        stage = ClipScoreStage(
            ClipSpec(model="zsad-tiny", weights=spec),
            ZeroShotImageScore(),
            weights_cache=str(tmp_path / "cache"),
            storage=fsio.storage_options(),
            retries=FAST,
        )
        stage.setup()
        assert server.hits["/m/tiny.pt"] >= 3
    # the loaded model is the checkpoint: same scores as loading the file directly
    loaded = stage.model.state_dict()
    import torch

    expected = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(loaded[k].cpu(), expected[k]) for k in expected)
    np.testing.assert_array_equal(
        tiny_clip_scores({"path": str(ckpt)}, tmp_path / "cache2"),
        tiny_clip_scores({"uri": spec["uri"], "sha256": digest}, tmp_path / "cache"),
    )


def test_model_load_fails_without_retry_budget(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    random_clip_checkpoint(ckpt)
    with FlakyServer({"/m/tiny.pt": ckpt.read_bytes()}, {"/m/tiny.pt": [503]}) as server:
        stage = ClipScoreStage(
            ClipSpec(model="zsad-tiny", weights={"uri": f"{server.url}/m/tiny.pt"}),
            ZeroShotImageScore(),
            weights_cache=str(tmp_path / "cache"),
            storage=fsio.storage_options(),
            retries=RetrySpec(model_load=0),
        )
        with pytest.raises(WeightsError, match="download failed"):
            stage.setup()


def test_retries_are_a_spec_section():
    spec = JobSpec.model_validate(
        {
            "clip": {"model": "zsad-tiny", "weights": None},
            "allow_random_weights": True,
            "retries": {"read": 5, "backoff_s": 0.5},
        }
    )
    assert spec.retries.read == 5 and spec.retries.model_load == 3 and spec.retries.backoff_s == 0.5
    with pytest.raises(ValueError):
        JobSpec.model_validate(
            {"clip": {"model": "zsad-tiny", "weights": None}, "allow_random_weights": True, "retries": {"reads": 5}}
        )
