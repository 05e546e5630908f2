"""GPU execution without a GPU: bf16 against fp32 per method (CPU autocast), out-of-memory injected
into the CLIP and SAM stages (the batch split, the rows that do not fit alone failed with
``OutOfMemory``), and the fused model stage against the stages one after another."""

import numpy as np
import pytest
import torch

from pipeline.config import (
    AggregationSpec,
    AprilGanAdapters,
    ClipSpec,
    FadeZeroShot,
    ForegroundSpec,
    MapOutputSpec,
    NoPixelMap,
    SamRefineSpec,
    SamSpec,
    TilingSpec,
    WinclipWindows,
    ZeroShotImageScore,
    load_spec,
)
from pipeline.io import contracts
from pipeline.models import precision
from pipeline.models.sam import SamEngine, build_sam
from pipeline.stages.aggregate import AggregateStage
from pipeline.stages.clip_score import ClipScoreStage
from pipeline.stages.foreground import ForegroundStage
from pipeline.stages.fused import FusedStage, find_stage
from pipeline.stages.plan import build_plan
from pipeline.stages.sam_refine import SamRefineStage
from pipeline.stages.tiling import TilingStage
from tests.helpers.batches import image_batch

SOURCE = contracts.load("inputs").names
#: bf16 against fp32 on the tiny models, max |difference| (scores and probability maps on [0, 1];
#: APRIL-GAN's maps on [0, 4]); README "GPU execution" and BENCHMARKS.md give the figures
TOLERANCE = {"none": (0.02, 0.0), "winclip_windows": (0.02, 0.02), "fade_zero_shot": (0.02, 0.02),
             "april_gan": (0.02, 0.05)}
PIXELS = {"none": NoPixelMap(), "winclip_windows": WinclipWindows(),
          "fade_zero_shot": FadeZeroShot(scales=(128, 192), grid=16, gem_depth=2, vision_multiplier=1.0),
          "april_gan": AprilGanAdapters(layers=(2, 4, 6, 8), image_size=128)}


def _images(n, sizes=((96, 112), (64, 64), (80, 120)), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def _scores(kind, prec, images):
    stage = ClipScoreStage(ClipSpec(model="zsad-tiny", weights=None, precision=prec), ZeroShotImageScore(),
                           pixel=PIXELS[kind])
    stage.setup()
    return stage, stage.score_images(images, ["widget"] * len(images))


@pytest.mark.parametrize("kind", sorted(PIXELS))
def test_bf16_stays_within_the_documented_tolerance_of_fp32(kind):
    images = _images(4)
    fp32_stage, fp32 = _scores(kind, "fp32", images)
    auto_stage, auto = _scores(kind, "auto", images)
    bf16_stage, bf16 = _scores(kind, "bf16", images)
    assert (fp32_stage.precision, auto_stage.precision, bf16_stage.precision) == ("fp32", "fp32", "bf16")
    assert np.array_equal(auto["score"], fp32["score"])  # the CPU default is fp32, bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(auto["maps"], fp32["maps"]))
    score_tol, map_tol = TOLERANCE[kind]
    d_score = np.abs(bf16["score"] - fp32["score"]).max()
    assert 0 < d_score < score_tol  # really computed in bf16, and close
    assert next(bf16_stage.model.parameters()).dtype == torch.float32  # weights stay fp32 under autocast
    if fp32["maps"]:
        d_map = max(np.abs(a - b).max() for a, b in zip(fp32["maps"], bf16["maps"]))
        assert 0 < d_map < map_tol
        assert all(m.dtype == np.float32 for m in bf16["maps"])


def test_sam_encoder_in_bf16_is_close_to_fp32():
    image = _images(1, sizes=((96, 128),))[0]
    sam = build_sam("tiny")
    fp32 = SamEngine(sam, precision="fp32").embed(image).features
    low = SamEngine(sam, precision="bf16")
    assert low.precision == "bf16" and SamEngine(sam, precision="auto").precision == "fp32"
    bf16 = low.embed(image).features
    assert bf16.dtype == torch.float32
    rel = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < rel < 0.02


# ---------------------------------------------------------------------------------------- out of memory
def test_clip_batch_is_split_and_only_rows_that_do_not_fit_alone_fail(monkeypatch, capfd):
    sizes = [(64, 64), (64, 64), (120, 120), (64, 64), (48, 64), (64, 64)]  # 4096 / 14400 / 3072 pixels
    images = _images(6, sizes=sizes, seed=1)
    stage = ClipScoreStage(ClipSpec(model="zsad-tiny", weights=None), ZeroShotImageScore(), pixel=WinclipWindows())
    plain = stage(image_batch(images, "widget"))
    assert list(plain["status"]) == ["ok"] * 6 and stage.oom_splits == 0
    monkeypatch.setenv(precision.INJECT_ENV, "clip_score:9000")  # two small images fit, the large one never
    out = stage(image_batch(images, "widget"))
    assert list(out["status"]) == ["ok", "ok", "error", "ok", "ok", "ok"]
    assert out["error_type"][2] == "OutOfMemory" and out["error_stage"][2] == "clip_score"
    assert "out of accelerator memory for this image alone" in out["error_message"][2]
    assert np.isnan(out["score"][2]) and out["anomaly_map"][2].size == 0
    ok = [0, 1, 3, 4, 5]
    assert np.allclose(out["score"][ok], plain["score"][ok], atol=1e-6)  # the split batch scores as the whole one
    assert all(np.allclose(out["anomaly_map"][i], plain["anomaly_map"][i], atol=1e-6) for i in ok)
    assert stage.oom_splits >= 3 and "retrying as 3 + 3" in capfd.readouterr().err


def test_tiles_of_a_row_are_split_too(monkeypatch):
    stage = ClipScoreStage(ClipSpec(model="zsad-tiny", weights=None), ZeroShotImageScore(),
                           tiling=TilingSpec(min_tile=48, tile_map_size=16))
    image = _images(1, sizes=((96, 96),))[0]
    tiles = np.array([[0, 0, 0, 48, 48], [1, 48, 0, 96, 48], [2, 0, 48, 48, 96]], np.int64)
    batch = image_batch([image], "widget", tiles=np.array([tiles], dtype=object))
    plain = stage(dict(batch))
    monkeypatch.setenv(precision.INJECT_ENV, "clip_score:2400")  # one 48 x 48 tile at a time
    out = stage(dict(batch))
    assert list(out["status"]) == ["ok"] and np.allclose(out["tile_scores"][0], plain["tile_scores"][0], atol=1e-6)
    monkeypatch.setenv(precision.INJECT_ENV, "clip_score:2000")  # not even one tile
    out = stage(dict(batch))
    assert out["error_type"][0] == "OutOfMemory"


@pytest.fixture(scope="module")
def engine():
    return SamEngine(build_sam("tiny"))


def test_sam_foreground_retries_smaller_point_batches_then_fails_the_image_alone(engine, monkeypatch, capfd):
    fg = ForegroundStage(ForegroundSpec(kind="sam_dis", points_per_side=4, points_per_batch=8), SamSpec(model="tiny"))
    fg.engine, fg._ready = engine, True
    images = _images(3, sizes=((64, 64), (128, 128), (64, 96)), seed=2)
    plain = fg(image_batch(images, "widget"))
    monkeypatch.setenv(precision.INJECT_ENV, "foreground:8000")
    out = fg(image_batch(images, "widget"))
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error_type"][1] == "OutOfMemory" and out["error_stage"][1] == "foreground"
    assert out["fg_rle"][0] == plain["fg_rle"][0] and out["fg_rle"][2] == plain["fg_rle"][2]
    err = capfd.readouterr().err
    assert "points_per_batch=4" in err and "points_per_batch=1" in err
    assert fg.cfg.points_per_batch == 8  # the spec is back as configured


def test_sam_refine_fails_the_image_that_does_not_fit(engine, monkeypatch):
    refine = SamRefineStage(SamRefineSpec(), SamSpec(model="tiny"), engine=engine)
    images = _images(2, sizes=((64, 64), (128, 128)), seed=3)
    maps = [np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)] * 2
    batch = image_batch(images, "widget", anomaly_map=np.array(maps + [None], dtype=object)[:2],
                        score=np.array([0.9, 0.9]),
                        max_pixel_score=np.array([1.0, 1.0]))
    monkeypatch.setenv(precision.INJECT_ENV, "sam_refine:5000")
    out = refine(batch)
    assert list(out["status"]) == ["ok", "error"] and out["refined"][0]
    assert out["error_type"][1] == "OutOfMemory" and out["error_stage"][1] == "sam_refine"


# ---------------------------------------------------------------------------------------- fused stages
def test_fused_stage_equals_the_stages_one_after_another(engine):
    tiling = TilingSpec(min_tile=64, tile_map_size=16)

    def stages():
        fg = ForegroundStage(ForegroundSpec(kind="sam_dis", points_per_side=4), SamSpec(model="tiny"),
                             share_embedding=True)
        fg.engine, fg._ready = engine, True
        clip = ClipScoreStage(ClipSpec(model="zsad-tiny", weights=None), ZeroShotImageScore(), pixel=WinclipWindows(),
                              tiling=tiling)
        return [fg, TilingStage(tiling), clip, AggregateStage(AggregationSpec(), MapOutputSpec(map_size=32)),
                SamRefineStage(SamRefineSpec(), SamSpec(model="tiny"), engine=engine, shared_embedding=True)]

    images = _images(2, sizes=((96, 128), (80, 80)), seed=4)
    batch = image_batch(images, "widget")
    one_by_one = dict(batch)
    for stage in stages():
        one_by_one = stage(one_by_one)
    fused = FusedStage(stages())
    assert fused.requires == ("image", "status", "error_stage", "error_type", "error_message", "height", "width",
                              "category")
    assert "sam_embedding" in fused.drops and "sam_embedding" not in fused.produces and "refined" in fused.produces
    out = fused(dict(batch))
    assert set(out) == set(one_by_one) and "sam_embedding" not in out
    assert list(out["status"]) == list(one_by_one["status"]) == ["ok", "ok"]
    assert np.array_equal(out["score"], one_by_one["score"])
    assert all(np.array_equal(a, b) for a, b in zip(out["anomaly_map"], one_by_one["anomaly_map"]))


def test_fuse_models_plans_one_actor_pool():
    spec = load_spec("jobs/vvv.yaml", overrides=["clip.weights=null", "sam.weights=null", "allow_random_weights=true",
                                                  "sam_refine={steps: 2}", "runtime.fuse_models=true",
                                                  "resources.sam_refine={num_gpus: 0.25, num_cpus: 2, memory: 1000}"])
    plan = build_plan(spec, source=SOURCE)
    assert [p.name for p in plan] == ["decode", "models", "encode"]
    fused = plan[1]
    assert fused.kind == "actor" and [p.name for p in fused.stage.parts] == ["foreground", "tiling", "clip_score",
                                                                             "aggregate", "sam_refine"]
    # resources.clip_score's pool, the largest num_gpus / num_cpus of the fused model stages
    assert (fused.resources.num_gpus, fused.resources.num_cpus, fused.resources.memory) == (0.5, 2, 1000)
    assert fused.resources.batch_size == spec.resources.clip_score.batch_size
    assert find_stage(plan, "clip_score") is fused.stage.parts[2]
    fused.stage.use_gpu = True
    assert all(p.use_gpu for p in fused.stage.parts if p.kind == "actor")
    unfused = build_plan(load_spec("jobs/vvv.yaml",
                                   overrides=["clip.weights=null", "sam.weights=null", "allow_random_weights=true"]),
                         source=SOURCE)
    assert [p.name for p in unfused] == ["decode", "foreground", "tiling", "clip_score", "aggregate", "encode"]
    single = build_plan(load_spec("jobs/default.yaml", overrides=["clip.weights=null", "allow_random_weights=true",
                                                                   "runtime.fuse_models=true"]), source=SOURCE)
    assert [p.name for p in single] == ["decode", "clip_score", "encode"]  # one model stage: nothing to fuse
