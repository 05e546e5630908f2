"""The sam_refine stage on the tiny SAM: refined rows, kept rows, per-row errors, the encoder run
once per image whatever the number of steps, and the combination rules."""

import json

import numpy as np
import pytest

from pipeline.config import SamRefineSpec, SamSpec
from pipeline.models.sam import SamEngine, build_sam
from pipeline.ops import rle
from pipeline.stages.sam_refine import SamRefineStage, combine


@pytest.fixture(scope="module")
def engine():
    return SamEngine(build_sam("tiny"))


def _scene(h=96, w=128):
    img = np.full((h, w, 3), 120, np.uint8)
    img[30:60, 40:80] = (220, 40, 40)
    stored = np.zeros((48, 64), np.float32)  # the CLIP map at the stored size (half the image)
    stored[15:30, 20:40] = 0.9
    stored[17:25, 25:33] = 1.0
    return img, stored


def _batch(images, maps, scores, status=None):
    n = len(images)
    return {
        "image": np.array(images + [None], dtype=object)[:n],
        "anomaly_map": np.array(maps + [None], dtype=object)[:n],
        "score": np.asarray(scores, dtype=np.float64),
        "max_pixel_score": np.array([float(np.max(m)) if np.size(m) else np.nan for m in maps]),
        "status": np.array(status or ["ok"] * n, dtype=object),
        "error_stage": np.array([None] * n, dtype=object),
        "error_type": np.array([None] * n, dtype=object),
        "error_message": np.array([None] * n, dtype=object),
    }


@pytest.mark.parametrize("steps", [1, 3])
def test_a_region_is_refined_and_the_encoder_runs_once(engine, steps):
    calls = []
    original = engine.sam.image_encoder.forward
    engine.sam.image_encoder.forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        stage = SamRefineStage(SamRefineSpec(steps=steps), SamSpec(model="tiny"), engine=engine)
        img, stored = _scene()
        out = stage(_batch([img], [stored], [0.7]))
    finally:
        engine.sam.image_encoder.forward = original
    assert calls == [1]  # once for the image, whatever the number of decoder steps
    assert list(out["status"]) == ["ok"] and out["refined"][0]
    info = json.loads(out["refine_info"][0])
    assert info["steps"] == steps and len(info["iou"]) == steps and (info["box"] is not None) == (steps == 3)
    for x, y in info["positive"]:  # in the extreme region, brought to the image's resolution
        assert 30 <= y < 62 and 38 <= x < 82
    mask = rle.decode(json.loads(out["refine_rle"][0]))
    assert mask.shape == (96, 128)
    final = out["anomaly_map"][0]
    assert final.shape == stored.shape and final.min() >= 0 and final.max() <= 1
    assert out["max_pixel_score"][0] == pytest.approx(float(final.max()))
    assert np.isfinite(out["sam_refine_ms"][0])


def test_rows_below_the_gate_or_without_a_region_keep_their_map_and_bad_maps_are_errors(engine):
    stage = SamRefineStage(SamRefineSpec(score_gate=0.5, threshold_mode="absolute", threshold=0.95),
                           SamSpec(model="tiny"),
                           engine=engine)
    img, stored = _scene()
    low = stored * 0.5  # nothing reaches 0.95
    nan = stored.copy()
    nan[0, 0] = np.nan
    flat = np.full_like(stored, 0.97)
    out = stage(_batch([img, img, img, img, img, img], [stored, stored, low, nan, flat, np.zeros((0, 0), np.float32)],
                       [0.9, 0.1, 0.9, 0.9, 0.9, 0.9]))
    assert list(out["refined"]) == [True, False, False, False, False, False]
    assert list(out["status"]) == ["ok", "ok", "ok", "error", "error", "error"]
    assert np.array_equal(out["anomaly_map"][1], stored) and np.array_equal(out["anomaly_map"][2], low)
    assert out["refine_rle"][1] is None and out["refine_rle"][2] is None
    gate, below = json.loads(out["refine_info"][1]), json.loads(out["refine_info"][2])
    assert gate["refined"] is False and "score_gate" in gate["reason"]
    assert below["refined"] is False and "no pixel of the map reaches" in below["reason"]
    assert "absolute 0.95" in below["reason"]
    assert set(out["error_stage"][3:]) == {"sam_refine"}
    assert "NaN" in out["error_message"][3] and "constant" in out["error_message"][4].lower()
    assert "no pixel map" in out["error_message"][5]
    assert out["anomaly_map"][3].size == 0  # a failed row has no map to store


def test_failed_rows_pass_through_untouched(engine):
    stage = SamRefineStage(SamRefineSpec(), SamSpec(model="tiny"), engine=engine)
    img, stored = _scene()
    batch = _batch([img], [stored], [0.9], status=["error"])
    batch["error_stage"][0], batch["error_type"][0], batch["error_message"][0] = "decode", "CorruptImage", "bad"
    out = stage(batch)
    assert out["status"][0] == "error" and out["error_stage"][0] == "decode" and not out["refined"][0]


def test_the_combination_rules():
    c = np.array([[0.2, 0.6], [0.9, 0.1]])
    m = np.array([[True, False], [False, True]])
    assert np.allclose(combine(c, m, "max", 0.5, 0.0, 1.0), [[1.0, 0.6], [0.9, 1.0]])
    assert np.allclose(combine(c, m, "replace", 0.5, 0.0, 1.0), [[1.0, 0.0], [0.0, 1.0]])
    assert np.allclose(combine(c, m, "blend", 0.25, 0.0, 1.0), 0.75 * c + 0.25 * m)
    assert np.allclose(combine(c, m, "gate", 0.5, 0.0, 1.0), [[0.2, 0.0], [0.0, 0.1]])
    assert np.allclose(combine(4 * c, m, "max", 0.5, 0.0, 4.0), [[4.0, 2.4], [3.6, 4.0]])  # APRIL-GAN's [0, 4]
    with pytest.raises(ValueError, match="unknown combine"):
        combine(c, m, "min", 0.5, 0.0, 1.0)


def test_after_a_sam_foreground_the_image_is_encoded_once_for_both_stages(engine):
    """The foreground stage hands its SAM embedding to the refinement (sam_embedding), which drops it."""
    from pipeline.config import ForegroundSpec
    from pipeline.stages.foreground import ForegroundStage

    img, stored = _scene()
    fg = ForegroundStage(ForegroundSpec(kind="sam_dis", points_per_side=4), SamSpec(model="tiny"), share_embedding=True)
    fg.engine, fg._ready = engine, True
    refine = SamRefineStage(SamRefineSpec(), SamSpec(model="tiny"), engine=engine, shared_embedding=True)
    assert "sam_embedding" in fg.produces and refine.drops == ("sam_embedding",)
    calls = []
    original = engine.sam.image_encoder.forward
    engine.sam.image_encoder.forward = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        batch = _batch([img], [stored], [0.9])
        after_fg = fg({k: v for k, v in batch.items() if k not in ("anomaly_map", "score", "max_pixel_score")})
        assert after_fg["sam_embedding"][0].shape == (32, 16, 16)  # the tiny SAM's (C, g, g)
        out = refine({**after_fg, "anomaly_map": batch["anomaly_map"], "score": batch["score"],
                      "max_pixel_score": batch["max_pixel_score"]})
    finally:
        engine.sam.image_encoder.forward = original
    assert calls == [1] and out["refined"][0] and "sam_embedding" not in out
    # the same refinement as with its own encoding
    alone = SamRefineStage(SamRefineSpec(), SamSpec(model="tiny"), engine=engine)(_batch([img], [stored], [0.9]))
    assert alone["refine_info"][0] == out["refine_info"][0] and np.array_equal(alone["anomaly_map"][0],
                                                                               out["anomaly_map"][0])


def test_an_absolute_threshold_refines_a_defect_and_keeps_a_normal_image(engine):
    """The CLIP-SAM preset's rule (issue 29): a region exists only where the map passes an absolute
    threshold, so a normal image (its map below it everywhere) keeps its CLIP map and says why."""
    stage = SamRefineStage(SamRefineSpec(threshold_mode="absolute", threshold=0.8), SamSpec(model="tiny"),
                           engine=engine)
    img, defect = _scene()
    normal_img = np.full((96, 128, 3), 120, np.uint8)
    normal = np.clip(np.random.default_rng(0).normal(0.3, 0.05, size=(48, 64)), 0, 1).astype(np.float32)
    out = stage(_batch([img, normal_img], [defect, normal], [0.9, 0.2]))
    assert list(out["refined"]) == [True, False] and list(out["status"]) == ["ok", "ok"]
    assert np.array_equal(out["anomaly_map"][1], normal) and out["refine_rle"][1] is None
    info = json.loads(out["refine_info"][0])
    assert info["refined"] is True and info["multimask"] is True and info["geometry"] == "sam_input"
    assert "reaches the region threshold" in json.loads(out["refine_info"][1])["reason"]


def test_ring_and_spacing_are_measured_at_sams_input_resolution(engine):
    """With geometry sam_input the 25-px ring and 20-px spacing are SAM-input pixels (long side 1024):
    the same fraction of any image; with geometry image they are the image's own pixels."""
    stage = SamRefineStage(SamRefineSpec(), SamSpec(model="tiny"), engine=engine)
    assert stage.geometry(768, 1024) == (25, 20.0)
    assert stage.geometry(2048, 1536) == (51, 40.0)  # twice the resolution: twice the pixels
    assert stage.geometry(300, 512) == (13, 10.0)    # 12.5 -> 13, odd
    assert stage.geometry(40, 60) == (3, 20.0 * 60 / 1024)  # never below a 3-px kernel
    own = SamRefineStage(SamRefineSpec(geometry="image"), SamSpec(model="tiny"), engine=engine)
    assert own.geometry(2048, 1536) == own.geometry(40, 60) == (25, 20.0)
    img, stored = _scene()
    info = json.loads(stage(_batch([img], [stored], [0.9]))["refine_info"][0])
    assert (info["ring_kernel_px"], info["min_distance_px"]) == stage.geometry(96, 128)
