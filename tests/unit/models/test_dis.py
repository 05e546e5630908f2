"""DisModel on real (tiny) ONNX graphs built in code (tests/helpers/dis_models.py): a 1x1 convolution computing
k * (red - blue) followed by a sigmoid, so the expected foreground map is known in closed form."""

import sys

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pipeline.models import dis  # noqa: E402
from tests.helpers.dis_models import DIS_GAIN, red_blue_image, save_dis_model  # noqa: E402

K = DIS_GAIN  # conv gain: red pixel -> sigmoid(4) = 0.982, blue pixel -> sigmoid(-4) = 0.018


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_red_left_blue_right_non_square(tmp_path):
    model = dis.DisModel(save_dis_model(tmp_path / "m.onnx"), input_size=32)
    assert (model.input_name, model.output_name) == ("image", "mask")
    assert model.providers == ["CPUExecutionProvider"]
    img = red_blue_image(20, 50)
    m = model.predict(img)
    assert m.shape == (20, 50) and m.dtype == np.float32
    assert m.min() >= 0.0 and m.max() <= 1.0
    assert m[:, :22].min() > 0.95 and m[:, 28:].max() < 0.05  # foreground left, background right
    assert m.min() == pytest.approx(0.0, abs=1e-6) and m.max() == pytest.approx(1.0, abs=1e-6)  # min-max


def test_matches_hand_computation_without_resizing(tmp_path):
    """At the model's own size no resize happens: the map must equal the closed form
    minmax(sigmoid(K * ((r/255 - 0.5) - (b/255 - 0.5))))."""
    model = dis.DisModel(save_dis_model(tmp_path / "m.onnx", size=16), input_size=16)
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = img.astype(np.float64) / 255.0 - 0.5
    raw = _sigmoid(K * (x[..., 0] - x[..., 2]))
    want = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(model.predict(img), want, atol=1e-5)
    np.testing.assert_allclose(model.raw(model.preprocess(img)), raw, atol=1e-6)


def test_preprocess_uses_mean_and_std_on_unit_pixels(tmp_path):
    path = save_dis_model(tmp_path / "m.onnx", symbolic=True)
    img = np.full((5, 7, 3), (255, 51, 0), np.uint8)
    x = dis.DisModel(path, input_size=8).preprocess(img)
    assert x.shape == (1, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [0.5, 0.2 - 0.5, -0.5], atol=1e-6)
    y = dis.DisModel(path, input_size=8, mean=(0.485, 0.456, 0.406), std=(0.5, 0.5, 0.5)).preprocess(img)
    np.testing.assert_allclose(y[0, :, 0, 0], [(1 - 0.485) / 0.5, (0.2 - 0.456) / 0.5, -0.406 / 0.5], atol=1e-6)


def test_symbolic_input_shape_runs_at_input_size(tmp_path):
    model = dis.DisModel(save_dis_model(tmp_path / "dyn.onnx", symbolic=True), input_size=24)
    m = model.predict(red_blue_image(30, 12))
    assert m.shape == (30, 12)
    assert m[:, :5].mean() > 0.9 and m[:, 7:].mean() < 0.1


def test_constant_map_is_returned_clipped_not_divided_by_zero(tmp_path):
    model = dis.DisModel(save_dis_model(tmp_path / "flat.onnx", weights=(0.0, 0.0, 0.0)), input_size=32)
    m = model.predict(red_blue_image(10, 10))
    np.testing.assert_allclose(m, 0.5, atol=1e-6)


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an onnx model")
    with pytest.raises(dis.DisLoadError, match=r"bad\.onnx could not be loaded by onnxruntime"):
        dis.DisModel(str(bad))
    with pytest.raises(dis.DisLoadError, match=r"missing\.onnx does not exist"):
        dis.DisModel(str(tmp_path / "missing.onnx"))
    with pytest.raises(dis.DisLoadError, match=r"m\.onnx: the model's input is 32 x 32 px but input_size is 1024"):
        dis.DisModel(save_dis_model(tmp_path / "m.onnx"))
    model = dis.DisModel(save_dis_model(tmp_path / "m.onnx"), input_size=32)
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8"):
        model.predict(np.zeros((4, 4), np.uint8))


def test_missing_onnxruntime_says_how_to_install(tmp_path, monkeypatch):
    path = save_dis_model(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(dis.DisLoadError, match=r"pip install 'zsad\[onnx\]'"):
        dis.DisModel(path, input_size=32)


def test_providers_cuda_first_only_when_available(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert dis.default_providers("cuda") == ["CPUExecutionProvider"]
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert dis.default_providers("cuda:0") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert dis.default_providers("cpu") == ["CPUExecutionProvider"]
