"""The VVV stages chained in-process (no Ray): foreground -> tiling -> CLIP tile scoring -> aggregation
-> encode, with the tiny CLIP and tiny SAM on generated multi-instance images."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import (
    AggregationSpec,
    ClipSpec,
    ForegroundSpec,
    MapOutputSpec,
    SamSpec,
    TilingSpec,
    WinclipWindows,
    ZeroShotImageScore,
)
from pipeline.ops import rle
from pipeline.stages.aggregate import AggregateStage
from pipeline.stages.clip_score import ClipScoreStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.foreground import ForegroundStage
from pipeline.stages.tiling import TilingStage
from pipeline.synthetic import make_multi_instance_dataset
from tests.helpers.batches import image_batch
from tests.helpers.dis_models import red_blue_image, save_dis_model

TINY = ClipSpec(model="zsad-tiny", weights=None)
TILING = TilingSpec(min_tile=96, tile_map_size=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    info = make_multi_instance_dataset(str(root), n_good=2, n_bad=2, size=(192, 256), instances=(2, 4), seed=3)
    images = [np.asarray(Image.open(Path(info["root"]) / im["path"]).convert("RGB")) for im in info["images"]]
    return info, images


def _chain(images, fg: ForegroundSpec, sam: SamSpec | None = None, pixel=WinclipWindows(), top_fraction=0.25):
    clip = ClipScoreStage(TINY, ZeroShotImageScore(), pixel=pixel, tiling=TILING)
    stages = [ForegroundStage(fg, sam), TilingStage(TILING), clip,
              AggregateStage(AggregationSpec(top_fraction=top_fraction),
                                                                                    MapOutputSpec(map_size=128))]
    batch = image_batch(images, "pills")
    for stage in stages:
        batch = stage(batch)
    return batch, clip


def test_classical_foreground_tiles_each_instance_and_aggregates(dataset):
    info, images = dataset
    out, clip = _chain(images, ForegroundSpec(kind="classical"))
    assert list(out["status"]) == ["ok"] * len(images)
    for i, meta in enumerate(info["images"]):
        comps = np.asarray(out["fg_components"][i]).reshape(-1, 7)
        assert len(comps) == meta["n_instances"] == out["n_components"][i]
        tiles = np.asarray(out["tiles"][i]).reshape(-1, 5)
        assert out["scoring_mode"][i] == "tiles" and out["n_tiles"][i] == len(tiles) >= len(comps)
        h, w = images[i].shape[:2]
        for x0, y0, x1, y1 in meta["boxes"]:  # every instance's centre lies inside one of its tiles
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            assert any(t[1] <= cx < t[3] and t[2] <= cy < t[4] for t in tiles)
        assert (tiles[:, 1] >= 0).all() and (tiles[:, 2] >= 0).all()
        assert (tiles[:, 3] <= w).all() and (tiles[:, 4] <= h).all()
        # the tile scores equal scoring each crop alone, and the image score follows the top-25% rule
        crops = [images[i][y0:y1, x0:x1] for _, x0, y0, x1, y1 in tiles]
        alone = np.concatenate([clip.score_images([c], ["pills"], map_side=32)["score"] for c in crops])
        np.testing.assert_allclose(out["tile_scores"][i], alone, atol=1e-5)
        per_comp = {}
        for t, s in zip(tiles, alone):
            per_comp.setdefault(int(t[0]), []).append(s)
        comp_scores = sorted((float(np.mean(v)) for v in per_comp.values()), reverse=True)
        k = max(1, math.ceil(0.25 * len(comp_scores)))
        assert out["score"][i] == pytest.approx(np.mean(comp_scores[:k]), abs=1e-6)
        assert out["anomaly_map"][i].shape == (96, 128)  # map_size 128, aspect kept
        mask = rle.decode(json.loads(out["fg_rle"][i]))
        assert mask.shape == (h, w) and mask.sum() == comps[:, 5].sum()
    assert "tile_maps" not in out  # dropped by the aggregation: only compact columns travel on


def test_blank_image_falls_back_to_whole_image_scoring(dataset):
    _, images = dataset
    blank = np.full((150, 200, 3), 128, np.uint8)
    out, clip = _chain([blank, images[0]], ForegroundSpec(kind="classical"))
    assert out["scoring_mode"][0] == "whole_image_fallback" and out["n_components"][0] == 0
    assert np.asarray(out["tiles"][0]).tolist() == [[-1, 0, 0, 200, 150]]
    whole = clip.score_images([blank], ["pills"], map_side=32)["score"][0]
    assert out["score"][0] == pytest.approx(whole, abs=1e-6)
    assert out["scoring_mode"][1] == "tiles"


def test_tiny_sam_foreground_runs_and_counts_parts(dataset):
    _, images = dataset
    fg = ForegroundSpec(kind="sam_dis", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                        min_inside=0.5)
    out, _ = _chain(images[:2], fg, SamSpec(model="tiny"))
    for i in range(2):
        assert out["status"][i] == "ok", out["error_message"][i]
        assert out["fg_sam_masks"][i] >= out["fg_kept_masks"][i] >= 0
        comps = np.asarray(out["fg_components"][i]).reshape(-1, 7)
        assert comps[:, 6].sum() <= out["fg_kept_masks"][i]  # parts counted at most once
        assert out["scoring_mode"][i] in ("tiles", "whole_image_fallback")
        assert (out["scoring_mode"][i] == "tiles") == (len(comps) > 0)


def test_encode_after_aggregation_and_failed_rows_pass_through(dataset):
    _, images = dataset
    batch = image_batch([images[0], images[1]], "pills", status=["ok", "error"])  # row 1 failed in decode
    clip = ClipScoreStage(TINY, ZeroShotImageScore(), pixel=WinclipWindows(), tiling=TILING)
    for stage in (ForegroundStage(ForegroundSpec(kind="classical")), TilingStage(TILING), clip,
                  AggregateStage(AggregationSpec(), MapOutputSpec(map_size=64)), EncodeStage()):
        batch = stage(batch)
    assert batch["map_height"][0] > 0 and batch["map_png"][0]
    assert batch["status"][1] == "error" and batch["map_height"][1] == 0 and len(batch["tile_scores"][1]) == 0


def test_tiling_mode_needs_the_tiles_column():
    clip = ClipScoreStage(TINY, ZeroShotImageScore(), tiling=TILING)
    with pytest.raises(ValueError, match="no 'tiles' column"):
        clip(image_batch([np.zeros((32, 32, 3), np.uint8)], "pills"))


def test_clipseg_localiser_gives_the_tile_maps(dataset):
    pytest.importorskip("transformers")  # the optional extra; installed with the dev extra
    from pipeline.config import ClipSegMaps
    from pipeline.models.clipseg import ClipSegLocaliser, build_clipseg

    _, images = dataset
    out, clip = _chain(images[:1], ForegroundSpec(kind="classical"), pixel=ClipSegMaps(arch="tiny"))
    assert out["status"][0] == "ok", out["error_message"][0]
    assert out["anomaly_map"][0].shape == (96, 128) and np.isfinite(out["anomaly_map"][0]).all()
    # the stage's tile maps are the localiser's maps of each crop, scaled by the tile score in the aggregate
    tiles = np.asarray(out["tiles"][0]).reshape(-1, 5)
    _, x0, y0, x1, y1 = tiles[0]
    ref = ClipSegLocaliser(build_clipseg(None, arch="tiny"))
    expected = ref.maps([images[0][y0:y1, x0:x1]])[0]
    got = clip.score_images([images[0][y0:y1, x0:x1]], ["pills"], map_side=int(y1 - y0))["maps"][0]
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_sam_dis_uses_the_onnx_foreground_model_through_the_weights_spec(tmp_path):
    pytest.importorskip("onnxruntime")

    model = save_dis_model(tmp_path / "dis.onnx", size=32)
    image = red_blue_image(60, 80)  # red (foreground for this model) on the left half, blue on the right
    fg_spec = ForegroundSpec(kind="sam_dis", dis_model={"path": model}, dis_input_size=32, points_per_side=8,
                             pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
                             min_component_fraction=0)
    stage = ForegroundStage(fg_spec, SamSpec(model="tiny"))
    stage.setup()
    assert stage.dis is not None
    prob = stage.dis.predict(image)
    assert prob[:, :40].min() > 0.5 > prob[:, 40:].max()
    mask, comps, proposed, kept = stage.foreground(image)
    assert proposed >= 1 and kept <= proposed
    if mask.any():  # every kept SAM mask lies >= 80 % on the model's foreground side
        assert mask[:, :40].sum() >= 0.8 * mask.sum()
    assert all(c[3] <= 80 and c[4] <= 60 for c in comps)


def _originals_and_working(images, scale=3, working=0.5):
    """The dataset's images enlarged ``scale`` times (the originals) and those decoded at ``working``
    of that size, as the decode stage hands them on (pixels at the working size, the original
    height and width in the row)."""
    originals, small = [], []
    for im in images:
        h, w = im.shape[:2]
        big = np.asarray(Image.fromarray(im).resize((w * scale, h * scale), Image.Resampling.BICUBIC))
        originals.append(big)
        size = (round(w * scale * working), round(h * scale * working))
        small.append(np.asarray(Image.fromarray(big).resize(size, Image.Resampling.BICUBIC)))
    return originals, small


def _working_batch(originals, small):
    return image_batch(small, "pills", height=[o.shape[0] for o in originals], width=[o.shape[1] for o in originals])


@pytest.mark.parametrize("kind", ["classical", "sam_dis"])
def test_the_foreground_of_a_working_image_is_stored_at_the_original_size(dataset, kind):
    """decode.resolution working: the foreground is found on the working pixels and stored as a
    full-size decode stores it: the mask at the original size, boxes and areas in the original's
    pixels (those of the stored mask), close to the foreground of the original itself."""
    from scipy import ndimage

    _, images = dataset
    originals, small = _originals_and_working(images[:2])  # 576 x 768 originals, 288 x 384 working
    fg = ForegroundSpec(kind=kind, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_inside=0.5)
    stage = ForegroundStage(fg, SamSpec(model="tiny")).offering({"sam_embedding"})
    work = stage(_working_batch(originals, small))
    exact = stage(image_batch(originals, "pills"))
    for i, original in enumerate(originals):
        assert work["status"][i] == exact["status"][i] == "ok", work["error_message"][i]
        mask = rle.decode(json.loads(work["fg_rle"][i]))
        ref = rle.decode(json.loads(exact["fg_rle"][i]))
        assert mask.shape == ref.shape == original.shape[:2]
        comps = np.asarray(work["fg_components"][i]).reshape(-1, 7)
        assert mask.sum() == comps[:, 5].sum()
        raw, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        boxes = {(xs.start, ys.start, xs.stop, ys.stop) for ys, xs in ndimage.find_objects(raw)}
        assert n == len(comps) and boxes == {tuple(c[1:5]) for c in comps.tolist()}  # the stored mask's components
        assert ((comps[:, 1] < comps[:, 3]) & (comps[:, 3] <= 768) & (comps[:, 2] < comps[:, 4])
                & (comps[:, 4] <= 576)).all()
        if kind == "classical":  # the same objects as on the original's pixels, a few pixels apart
            want = np.asarray(exact["fg_components"][i]).reshape(-1, 7)
            assert len(comps) == len(want) >= 2
            assert np.abs(comps[:, 1:5] - want[:, 1:5]).max() <= 6  # measured: 1 px
            assert (mask & ref).sum() / (mask | ref).sum() > 0.95  # measured: IoU 0.981
        # SAM's embedding handed to sam_refine is the working image's (it sees the same pixels)
        assert (work["sam_embedding"][i].size > 0) == (kind == "sam_dis")


def test_tiles_in_original_pixels_are_cropped_from_the_working_image(dataset):
    """Tiling mode on a working image: tiles planned in the original's pixels (inside it), each
    scored on the working image's crop of the same region (records.working_box), the maps pasted
    back at the size the original gives."""
    from pipeline.stages.records import with_original, working_box

    _, images = dataset
    originals, small = _originals_and_working(images[:2])
    clip = ClipScoreStage(TINY, ZeroShotImageScore(), pixel=WinclipWindows(), tiling=TILING)
    batch = _working_batch(originals, small)
    for stage in (ForegroundStage(ForegroundSpec(kind="classical")), TilingStage(TILING), clip,
                  AggregateStage(AggregationSpec(), MapOutputSpec(map_size=128))):
        batch = stage(batch)
    for i, original in enumerate(originals):
        assert batch["status"][i] == "ok" and batch["scoring_mode"][i] == "tiles", batch["error_message"][i]
        tiles = np.asarray(batch["tiles"][i]).reshape(-1, 5)
        assert (tiles[:, 3] <= 768).all() and (tiles[:, 4] <= 576).all() and (tiles[:, 3] - tiles[:, 1] >= 96).all()
        marked = with_original(small[i], *original.shape[:2])
        crops = [small[i][y0:y1, x0:x1] for x0, y0, x1, y1 in (working_box(marked, t[1:]) for t in tiles)]
        assert all(abs(c.shape[0] - (t[4] - t[2]) / 2) <= 1 for c, t in zip(crops, tiles))  # half the tile
        alone = np.concatenate([clip.score_images([c], ["pills"], map_side=32)["score"] for c in crops])
        np.testing.assert_allclose(batch["tile_scores"][i], alone, atol=1e-5)
        assert batch["anomaly_map"][i].shape == (96, 128)  # the original's 576 x 768 at map_size 128
