"""DecodeStage on plain dict batches (no Ray), and the shared column check."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
from PIL import Image

import pipeline.stages.decode as decode_module
from pipeline.config import DecodeSpec, RetrySpec
from pipeline.stages.base import check_columns
from pipeline.stages.decode import DecodeStage
from tests.helpers.badfiles import write_bad_inputs, write_good_images
from tests.helpers.batches import image_batch

PRODUCED = ("image", "height", "width", "status", "error_stage", "error_type", "error_message", "decode_ms")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    expected = write_bad_inputs(folder / "bad")
    good = write_good_images(folder / "good", 3, size=(48, 40), seed=11)
    rows = [(str(path), {"expect": "ok", "error_type": None, "shape": (48, 40)}) for path in good]
    rows += [(str(folder / "bad" / name), spec) for name, spec in expected.items()]
    rows.append((str(folder / "missing.png"), {"expect": "error", "error_type": "FileNotFoundError", "shape": None}))
    return rows


def make_batch(rows):
    n = len(rows)
    return {
        "uri": np.array([uri for uri, _ in rows], dtype=object),
        "image_id": np.array([f"id-{i}" for i in range(n)], dtype=object),
        "gt_label": np.arange(n, dtype=np.int64) % 2,
    }


def test_mixed_batch_statuses_errors_and_images(corpus):
    batch = make_batch(corpus)
    out = DecodeStage(DecodeSpec())(batch)

    assert set(out) == set(batch) | set(PRODUCED)
    n = len(corpus)
    for name in out:
        assert len(out[name]) == n, name
    assert out["height"].dtype == np.int64 and out["width"].dtype == np.int64
    assert out["decode_ms"].dtype == np.float64
    for name in ("image", "status", "error_stage", "error_type", "error_message"):
        assert out[name].dtype == object, name

    for i, (uri, spec) in enumerate(corpus):
        image = out["image"][i]
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3, uri
        assert out["decode_ms"][i] >= 0.0
        if spec["expect"] == "ok":
            assert out["status"][i] == "ok", (uri, out["error_type"][i], out["error_message"][i])
            assert image.shape == (*spec["shape"], 3), uri
            assert (out["height"][i], out["width"][i]) == spec["shape"], uri
            assert out["error_stage"][i] is None and out["error_type"][i] is None
            assert out["error_message"][i] is None
        else:
            assert out["status"][i] == "error", uri
            assert out["error_stage"][i] == "decode", uri
            assert out["error_type"][i] == spec["error_type"], (uri, out["error_type"][i], out["error_message"][i])
            assert isinstance(out["error_message"][i], str) and out["error_message"][i], uri
            assert image.shape == (0, 0, 3), uri
            assert out["height"][i] == 0 and out["width"][i] == 0, uri


def test_good_pixels_match_the_files(corpus):
    rows = [row for row in corpus if "good_" in row[0]]
    out = DecodeStage(DecodeSpec())(make_batch(rows))
    for i, (uri, _) in enumerate(rows):
        with Image.open(uri) as im:
            np.testing.assert_array_equal(out["image"][i], np.asarray(im.convert("RGB")))
    assert len({out["image"][i].tobytes() for i in range(len(rows))}) == len(rows)  # distinct content
    assert np.all(out["decode_ms"] > 0.0)


def test_passthrough_columns_unchanged(corpus):
    batch = make_batch(corpus)
    batch["score_hint"] = np.linspace(0, 1, len(corpus))
    copies = {name: column.copy() for name, column in batch.items()}
    out = DecodeStage(DecodeSpec())(batch)
    for name, column in copies.items():
        assert out[name] is batch[name], name  # passed through, not rebuilt
        np.testing.assert_array_equal(out[name], column)
    assert set(batch) == set(copies)  # the input dict itself is not modified


def test_missing_file_message_names_uri(corpus):
    uri = next(uri for uri, spec in corpus if spec["error_type"] == "FileNotFoundError")
    out = DecodeStage(DecodeSpec())({"uri": np.array([uri], dtype=object)})
    assert out["error_type"][0] == "FileNotFoundError"
    assert uri in out["error_message"][0]
    assert out["error_stage"][0] == "decode"


def test_read_errors_become_rows_with_uri_in_message(monkeypatch, tmp_path):
    def fake_read(uri, options=None):
        if uri.endswith("denied.png"):
            raise PermissionError(f"{uri}: access denied (403)")
        raise TimeoutError("connection timed out")  # a message without the URI

    monkeypatch.setattr(decode_module, "read_bytes", fake_read)
    uris = np.array(["s3://bucket/denied.png", "s3://bucket/slow.png"], dtype=object)
    out = DecodeStage(DecodeSpec(), retries=RetrySpec(read=0))({"uri": uris})
    assert list(out["status"]) == ["error", "error"]
    assert list(out["error_type"]) == ["PermissionError", "TimeoutError"]
    assert out["error_message"][0] == "s3://bucket/denied.png: access denied (403)"
    assert out["error_message"][1] == "cannot read s3://bucket/slow.png: connection timed out"
    # with retries, the transient timeout is retried and the message says how often
    out = DecodeStage(DecodeSpec(), retries=RetrySpec(read=2, backoff_s=0.0))({"uri": uris})
    assert out["error_message"][0] == "s3://bucket/denied.png: access denied (403)"
    assert out["error_message"][1] == "cannot read s3://bucket/slow.png: connection timed out (after 3 attempts)"


def test_storage_options_reach_read_bytes(monkeypatch, corpus):
    seen = []
    real = decode_module.read_bytes

    def spy(uri, options=None):
        seen.append(options)
        return real(uri, options)

    monkeypatch.setattr(decode_module, "read_bytes", spy)
    stage = DecodeStage(DecodeSpec(), storage={"anon": True})
    stage.setup()
    stage({"uri": np.array([corpus[0][0]], dtype=object)})
    assert seen == [{"anon": True}]


def test_previously_failed_rows_are_kept_and_not_fetched(monkeypatch, corpus):
    good_uri = corpus[0][0]
    fetched = []
    real = decode_module.read_bytes

    def spy(uri, options=None):
        fetched.append(uri)
        return real(uri, options)

    monkeypatch.setattr(decode_module, "read_bytes", spy)
    batch = image_batch(None, status=["ok", "error", "ok"], failure=("list", "ManifestError", "row 7: bad category"),
                        uri=[good_uri, "/nowhere/listed-but-broken.png", good_uri])  # row 1 failed when listed
    out = DecodeStage(DecodeSpec())(batch)
    assert fetched == [good_uri, good_uri]
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error_stage"][1] == "list"
    assert out["error_type"][1] == "ManifestError"
    assert out["error_message"][1] == "row 7: bad category"
    assert out["image"][1].shape == (0, 0, 3)
    assert out["height"][1] == 0 and out["width"][1] == 0 and out["decode_ms"][1] == 0.0
    assert out["image"][0].shape == out["image"][2].shape == (48, 40, 3)
    assert out["error_type"][0] is None and out["error_type"][2] is None
    assert list(batch["status"]) == ["ok", "error", "ok"]  # input columns not mutated


def test_string_dtype_columns(corpus):
    uris = np.array([corpus[0][0], corpus[1][0]])  # numpy unicode, as Ray may hand them over
    assert uris.dtype.kind == "U"
    out = DecodeStage(DecodeSpec())({"uri": uris, "status": np.array(["ok", "error"])})
    assert list(out["status"]) == ["ok", "error"]
    assert out["image"][0].shape == (48, 40, 3)


def test_max_pixels_from_config(corpus):
    out = DecodeStage(DecodeSpec(max_pixels=100))({"uri": np.array([corpus[0][0]], dtype=object)})
    assert out["status"][0] == "error"
    assert out["error_type"][0] == "DecompressionBomb"
    assert "100" in out["error_message"][0]


def test_missing_required_column_names_it_and_the_stage():
    with pytest.raises(ValueError) as info:
        DecodeStage(DecodeSpec())({"path": np.array(["a.png"], dtype=object)})
    assert "'uri'" in str(info.value)
    assert "'decode'" in str(info.value)


def test_empty_batch():
    out = DecodeStage(DecodeSpec())({"uri": np.array([], dtype=object)})
    for name in PRODUCED:
        assert len(out[name]) == 0, name
    assert out["height"].dtype == np.int64 and out["decode_ms"].dtype == np.float64
    assert out["image"].dtype == object


def test_stage_declares_columns_and_imports_no_ray():
    assert DecodeStage.requires == ("uri",)
    assert DecodeStage(DecodeSpec()).produces == PRODUCED
    tree = ast.parse(inspect.getsource(decode_module))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "ray" not in imported
    assert DecodeStage(DecodeSpec()).setup() is None


# --------------------------------------------------------------------------------------------
# check_columns
# --------------------------------------------------------------------------------------------


def test_check_columns_returns_row_count():
    batch = {"uri": np.array(["a", "b", "c"]), "x": np.zeros(3)}
    assert check_columns("demo", batch, ("uri",)) == 3
    assert check_columns("demo", batch, ()) == 3
    assert check_columns("demo", {}, ()) == 0


def test_check_columns_names_every_missing_column():
    with pytest.raises(ValueError) as info:
        check_columns("clip_score", {"uri": np.array(["a"])}, ("uri", "image", "category"))
    message = str(info.value)
    assert "'clip_score'" in message
    assert "'image'" in message and "'category'" in message
    assert "'uri'" in message  # listed among the columns the batch has


def test_check_columns_rejects_ragged_batches():
    with pytest.raises(ValueError, match=r"different lengths.*uri=2.*x=3"):
        check_columns("demo", {"uri": np.array(["a", "b"]), "x": np.zeros(3)}, ("uri",))


def test_check_columns_rejects_non_columns():
    with pytest.raises(ValueError, match="'x' is not a sequence"):
        check_columns("demo", {"uri": np.array(["a"]), "x": 5}, ("uri",))
    with pytest.raises(TypeError, match="dict of columns"):
        check_columns("demo", [("uri", [1])], ("uri",))
