"""Mixed precision, device placement and out-of-memory splitting (pipeline.models.precision) without a
GPU: bf16 autocast runs on the CPU, the meta device stands in for a second device (an op that mixes
it with CPU tensors fails as CUDA would), and out-of-memory errors are raised by the test."""

import numpy as np
import pytest
import torch

from pipeline.models import clip as clip_models
from pipeline.models import pixel, precision, scoring, vit
from pipeline.models.precision import OutOfMemory, split_on_oom


def test_resolve_auto_is_fp32_on_cpu_and_fp16_falls_back():
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("fp16", "cpu") == "fp32"
    assert precision.resolve("bf16", "cpu") == "bf16"
    assert precision.resolve("fp32", "meta") == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'fp64'"):
        precision.resolve("fp64", "cpu")


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64)


def test_forward_pass_runs_in_the_active_precision_and_returns_fp32():
    lin = _linear()
    x = torch.randn(8, 64)

    @precision.forward_pass
    def forward(t):
        return {"out": [lin(t)], "n": 3}

    plain = forward(x)["out"][0]
    assert torch.equal(plain, lin(x))  # no active block: as written
    with precision.active("cpu", "fp32"):
        assert torch.equal(forward(x)["out"][0], plain)  # fp32: no autocast, bit for bit
    with precision.active("cpu", "bf16"):
        low = forward(x)
        after = lin(x)  # outside a forward pass: fp32 even inside the block
    assert low["out"][0].dtype == torch.float32 and low["n"] == 3
    assert after.dtype == torch.float32 and torch.equal(after, plain)
    diff = (low["out"][0] - plain).abs().max().item()
    assert 0 < diff < 0.05  # computed in bf16 (not bit-equal), close to fp32
    ref = (x.bfloat16() @ lin.weight.bfloat16().T + lin.bias.bfloat16()).float()
    assert torch.allclose(low["out"][0], ref, atol=2e-2)


def test_split_on_oom_halves_down_to_single_rows():
    calls = []

    def fn(rows):
        calls.append(list(rows))
        if len(rows) > 2 or 5 in rows:  # more than two rows never fit; row 5 never fits
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sum(rows)

    splits = []
    out = split_on_oom(fn, list(range(8)), "clip_score", on_split=lambda n, h: splits.append((n, h)))
    assert [rows for rows, _ in out] == [[0, 1], [2, 3], [4], [5], [6, 7]]
    results = {tuple(rows): r for rows, r in out}
    assert results[(0, 1)] == 1 and results[(6, 7)] == 13 and results[(4,)] == 4
    err = results[(5,)]
    assert isinstance(err, OutOfMemory) and "stage clip_score" in str(err) and "Tried to allocate" in str(err)
    assert splits == [(8, 4), (4, 2), (4, 2), (2, 1)]
    assert calls[0] == list(range(8))


def test_split_on_oom_lets_other_errors_through():
    def fn(rows):
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        split_on_oom(fn, [0, 1], "clip_score")


def test_out_of_memory_is_recognised_by_type_and_message():
    assert precision.is_out_of_memory(torch.OutOfMemoryError("x"))
    assert precision.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert precision.is_out_of_memory(OutOfMemory("x"))
    assert not precision.is_out_of_memory(RuntimeError("size mismatch"))
    assert not precision.is_out_of_memory(MemoryError())  # host memory: not the accelerator's


def test_injected_budget(monkeypatch):
    monkeypatch.setenv(precision.INJECT_ENV, "clip_score:1000, foreground:50")
    assert precision.injected_budget("clip_score") == 1000 and precision.injected_budget("foreground") == 50
    assert precision.injected_budget("sam_refine") is None
    precision.check_injected("clip_score", [(20, 25, 3), (20, 25, 3)])  # exactly the budget fits
    with pytest.raises(torch.OutOfMemoryError, match="1001 pixels > 1000"):
        precision.check_injected("clip_score", [(20, 25, 3), (1, 1, 3), (20, 25, 3)])
    monkeypatch.setenv(precision.INJECT_ENV, "clip_score=3")
    with pytest.raises(ValueError, match="is not STAGE:PIXELS"):
        precision.injected_budget("clip_score")


# ---------------------------------------------------------------------------------------- devices
@pytest.fixture(scope="module")
def meta_model():
    model, pre = clip_models.build_clip(clip_models.TINY_MODEL)
    return model.to("meta"), pre


def test_preprocess_moves_pixels_to_the_device_and_resizes_there(meta_model):
    _, pre = meta_model
    rng = np.random.default_rng(0)
    images = [
        torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 60), (50, 60), (70, 40))
    ]
    batch = clip_models.preprocess_images(images, pre, device="meta")
    assert batch.device.type == "meta" and batch.shape == (3, 3, pre.size, pre.size)
    cpu = clip_models.preprocess_images(images, pre)
    assert cpu.device.type == "cpu"
    one_by_one = torch.cat([clip_models.preprocess_images([im], pre) for im in images])
    assert torch.equal(cpu, one_by_one)  # images of one size resized together give the same pixels


def test_model_functions_keep_every_tensor_on_the_model_device(meta_model):
    """A tensor made on the CPU inside these functions (a mean, an index, a mask) would meet the meta
    tensors and fail, as it would on a GPU."""
    model, pre = meta_model
    images = [torch.zeros((40, 40, 3), dtype=torch.uint8)] * 2
    batch = clip_models.preprocess_images(images, pre, device="meta")
    feats = clip_models.encode_image(model, batch)
    text = scoring.build_classifier(
        torch.randn(3, feats.shape[1], device="meta"), torch.randn(2, feats.shape[1], device="meta"), "mean_norm_renorm"
    )
    probs = scoring.anomaly_probability(feats, text, 0.01)
    with precision.active("meta", "fp32"):
        wmap = pixel.winclip_map(model.visual, batch, text, 0.01, probs, (2, 3))
        lang, vis, fused = pixel.fade_maps(model.visual, {pre.size: batch}, text, grid=8, depth=2)
        _, tokens = vit.forward_with_layers(model.visual, batch, (2, 4))
    for t in (feats, probs, wmap, lang, vis, fused, *tokens):
        assert t.device.type == "meta"
