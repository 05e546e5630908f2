"""CLIP scoring stage on plain dicts (no Ray): scores, caching, pass-through of failed rows."""

import numpy as np
import pytest
import torch

from pipeline.config import ClipSpec, FadeZeroShot, MapOutputSpec, WinclipWindows, ZeroShotImageScore
from pipeline.models import clip as clip_models
from pipeline.models.prompts import PROMPT_SETS
from pipeline.models.scoring import anomaly_probability, build_classifier
from pipeline.stages.clip_score import ClipScoreStage
from tests.helpers.batches import image_batch

TINY = ClipSpec(model="zsad-tiny", weights=None)


def _images(seed, n, sizes=((64, 64), (80, 48), (30, 90))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def test_scores_equal_an_independent_computation():
    stage = ClipScoreStage(TINY, ZeroShotImageScore())
    images = _images(0, 3)
    out = stage(image_batch(images, ["metal_nut", "pcb1", "metal_nut"]))
    assert out["score"].dtype == np.float64 and np.all((out["score"] > 0) & (out["score"] < 1))
    assert list(out["status"]) == ["ok"] * 3 and np.all(out["clip_score_ms"] > 0)

    model, pre = clip_models.build_clip("zsad-tiny")

    tok = clip_models.tokenizer("zsad-tiny")
    for i, (img, name) in enumerate(zip(images, ["metal nut", "printed circuit board", "metal nut"])):
        normal, anomalous = PROMPT_SETS["winclip"].sentences(name)
        with torch.no_grad():
            tn = model.encode_text(tok(normal)).float()
            ta = model.encode_text(tok(anomalous)).float()
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
            x = torch.nn.functional.interpolate(x, size=(128, 128), mode="bicubic", antialias=True).clamp(0, 1)
            mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
            std = torch.tensor(pre.std).view(1, 3, 1, 1)
            f = model.encode_image((x - mean) / std).float()
        expected = anomaly_probability(f, build_classifier(tn, ta, "mean_norm_renorm"), 0.01).item()
        assert out["score"][i] == pytest.approx(expected, abs=1e-5)


def test_batch_invariance_and_text_cache():
    stage = ClipScoreStage(TINY, ZeroShotImageScore())
    images = _images(1, 3)
    together = stage(image_batch(images, ["a", "b", "a"]))["score"]
    assert set(stage._text) == {"a", "b"}
    cached = stage._text["a"]
    alone = [stage(image_batch([img], [c]))["score"][0] for img, c in zip(images, ["a", "b", "a"])]
    assert stage._text["a"] is cached  # computed once per category per actor
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_failed_rows_pass_through_unscored():
    stage = ClipScoreStage(TINY, ZeroShotImageScore())
    images = _images(2, 3)
    images[1] = np.zeros((0, 0, 3), np.uint8)
    out = stage(image_batch(images, ["a", "a", "a"], status=["ok", "error", "ok"]))
    assert np.isnan(out["score"][1]) and np.isnan(out["clip_score_ms"][1])
    assert out["status"][1] == "error" and out["error_stage"][1] == "decode"
    assert np.isfinite(out["score"][[0, 2]]).all()
    assert list(out["uri"]) == ["/x/0.png", "/x/1.png", "/x/2.png"]  # pass-through columns kept


def test_a_row_that_breaks_scoring_becomes_an_error_row():
    stage = ClipScoreStage(TINY, ZeroShotImageScore())
    images = _images(3, 3)
    images[2] = np.zeros((5, 5), np.uint8)  # wrong shape: not (H, W, 3)
    out = stage(image_batch(images, ["a", "a", "a"]))
    assert list(out["status"]) == ["ok", "ok", "error"]
    assert out["error_stage"][2] == "clip_score" and "scoring failed" in out["error_message"][2]
    assert np.isfinite(out["score"][:2]).all() and np.isnan(out["score"][2])


def test_missing_column_is_named():
    stage = ClipScoreStage(TINY, ZeroShotImageScore())
    batch = image_batch(_images(0, 1), ["a"])
    del batch["category"]
    with pytest.raises(ValueError, match="'category'"):
        stage(batch)


@pytest.mark.parametrize(
    "pixel",
    [WinclipWindows(window_sizes=(2, 3)),
     FadeZeroShot(scales=(128, 192), grid=12, gem_depth=2, prompt_sets=("winclip",))],
    ids=["winclip_windows", "fade_zero_shot"],
)
def test_maps_are_batch_invariant(pixel):
    stage = ClipScoreStage(TINY, ZeroShotImageScore(), pixel=pixel, maps=MapOutputSpec(map_size=40))
    images = _images(4, 3)
    together = stage(image_batch(images, ["a", "b", "a"]))
    for i, img in enumerate(images):
        alone = stage(image_batch([img], [["a", "b", "a"][i]]))
        assert alone["score"][0] == pytest.approx(together["score"][i], abs=1e-5)
        np.testing.assert_allclose(alone["anomaly_map"][0], together["anomaly_map"][i], atol=1e-5)
    for i, img in enumerate(images):
        m = together["anomaly_map"][i]
        assert m.dtype == np.float32 and max(m.shape) == 40  # long side = map_size, aspect kept
        assert abs(m.shape[0] / m.shape[1] - img.shape[0] / img.shape[1]) < 0.1
        assert 0 <= m.min() and m.max() <= 1 and together["max_pixel_score"][i] == pytest.approx(float(m.max()))
    if isinstance(pixel, FadeZeroShot):
        assert np.isfinite(together["score_vision"]).all()
    else:
        assert np.isnan(together["score_vision"]).all()


def test_original_map_size_and_no_map_without_pixel_method():
    img = _images(5, 1, sizes=((30, 50),))
    stage = ClipScoreStage(TINY, ZeroShotImageScore(), pixel=WinclipWindows(), maps=MapOutputSpec(map_size="original"))
    assert stage(image_batch(img, ["a"]))["anomaly_map"][0].shape == (30, 50)
    plain = ClipScoreStage(TINY, ZeroShotImageScore())(image_batch(img, ["a"]))
    assert plain["anomaly_map"][0].shape == (0, 0) and np.isnan(plain["max_pixel_score"][0])


def test_impossible_pixel_settings_fail_at_setup():
    with pytest.raises(ValueError, match="gem_depth=12 exceeds the 8 blocks of zsad-tiny"):
        ClipScoreStage(TINY, ZeroShotImageScore(), pixel=FadeZeroShot(gem_depth=12)).setup()
    with pytest.raises(ValueError, match=r"window_sizes \[9\] do not fit the 8 x 8 patch grid"):
        ClipScoreStage(TINY, ZeroShotImageScore(), pixel=WinclipWindows(window_sizes=(2, 9))).setup()


def test_cpu_int8_mode_scores_close_to_fp32():
    images = _images(6, 2)
    fp32 = ClipScoreStage(TINY, ZeroShotImageScore(), pixel=WinclipWindows())(image_batch(images, ["a", "a"]))
    int8 = ClipScoreStage(ClipSpec(model="zsad-tiny", weights=None, cpu_int8=True), ZeroShotImageScore(),
                          pixel=WinclipWindows())
    out = int8(image_batch(images, ["a", "a"]))
    assert "DynamicQuantizedLinear" in repr(int8.model.visual.transformer.resblocks[0].mlp.c_fc)
    assert np.abs(out["score"] - fp32["score"]).max() < 0.05
    assert np.abs(out["anomaly_map"][0] - fp32["anomaly_map"][0]).max() < 0.05
