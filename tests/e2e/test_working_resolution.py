"""decode.resolution: working end to end (issue 31): the default, clip_sam and vvv presets on the tiny
models, on large generated JPEGs, through the in-process executor, against the same run with exact:
the same tables and map sizes (the original size), masks, boxes and tiles in original pixels, scores
and maps within the documented deviation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.ops import heatmap
from tests.helpers.zsad import TINY, zsad

pytestmark = pytest.mark.integration


def _images(folder, n=4):
    rng = np.random.default_rng(7)
    folder.mkdir()
    for i in range(n):
        h, w = (960, 1280) if i % 2 == 0 else (1280, 960)
        small = (rng.random((h // 32, w // 32, 3)) * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).copy()
        if i >= 2:  # a drawn defect
            big[h // 3 : h // 3 + 120, w // 3 : w // 3 + 160] = (250, 20, 20)
        Image.fromarray(big).save(folder / f"img{i}.jpg", quality=92)


def _run(tmp_path, data, mode):
    out = tmp_path / f"out-{mode}"
    res = zsad("run", "jobs/default.yaml", "--input", str(data), "--output", str(out), "--run-id", "r", *TINY,
               "--executor", "local", "--set", f"decode.resolution={mode}", "--set", "maps.map_size=original",
               # the tiny random model's vision map saturates the fused map at x 80: a scale that keeps it inside
               "--set", "pixel.vision_multiplier=1")
    assert res.returncode == 0, res.stderr[-3000:]
    scores = pd.read_parquet(out / "r" / "scores").set_index("uri").sort_index()
    masks = pd.read_parquet(out / "r" / "masks").set_index("image_id")
    return scores, masks


def test_the_default_preset_in_working_mode_stays_close_to_exact(tmp_path):
    data = tmp_path / "data"
    _images(data)
    exact, exact_masks = _run(tmp_path, data, "exact")
    work, work_masks = _run(tmp_path, data, "working")
    assert (work["status"] == "ok").all() and list(work.index) == list(exact.index)
    assert work["height"].tolist() == exact["height"].tolist() == [960, 1280, 960, 1280]  # the original size
    assert np.abs(work["score"] - exact["score"]).max() < 0.005  # measured: 5.5e-4
    for image_id, row in work_masks.iterrows():
        ref = exact_masks.loc[image_id]
        assert (row.map_height, row.map_width) == (ref.map_height, ref.map_width)  # maps at the original size
        assert max(row.map_height, row.map_width) == 1280
        a = heatmap.decode_png16(row.map_png, row.map_min, row.map_max)
        b = heatmap.decode_png16(ref.map_png, ref.map_min, ref.map_max)
        assert b.std() > 1e-3  # a map with something in it (not saturated)
        assert np.abs(a - b).mean() < 0.005 and np.abs(a - b).max() < 0.02  # measured: 7e-4, 2.8e-3


def test_the_clip_sam_cascade_refines_at_the_working_size_and_stores_the_original_size(tmp_path):
    """sam_refine with decode.resolution working: SAM sees the image at its working size (long side
    at least SAM's 1024 px), and the refined mask and its prompts come out in the original image's
    pixels, as with exact."""
    import json

    from pipeline.ops import rle

    data = tmp_path / "data"
    _images(data, n=3)
    runs = {}
    for mode in ("exact", "working"):
        out = tmp_path / f"sam-{mode}"
        res = zsad("run", "jobs/clip_sam.yaml", "--input", str(data), "--output", str(out), "--run-id", "r", *TINY,
                   "--executor", "local", "--set", f"decode.resolution={mode}", report=False)
        assert res.returncode == 0, res.stderr[-3000:]
        scores = pd.read_parquet(out / "r" / "scores").set_index("image_id")
        runs[mode] = pd.read_parquet(out / "r" / "masks").set_index("image_id").join(scores[["height", "width"]])
    work, exact = runs["working"], runs["exact"]
    assert work["refined"].any() and list(work["refined"]) == list(exact["refined"])
    agree = []
    for image_id, row in work[work["refined"]].iterrows():
        mask = rle.decode(json.loads(row.refine_rle))
        assert mask.shape == (row.height, row.width) and max(mask.shape) == 1280  # the original size
        info = json.loads(row.refine_info)
        points = [*info["positive"], *info["negative"]]
        assert all(-0.5 <= x <= row.width - 0.5 and -0.5 <= y <= row.height - 0.5 for x, y in points)
        ref = exact.loc[image_id]
        agree.append(float((mask == rle.decode(json.loads(ref.refine_rle))).mean()))
        # the prompts land where the full-size decode put them (measured: within 0.2 px)
        assert np.abs(np.array(info["positive"]) - np.array(json.loads(ref.refine_info)["positive"])).max() < 2.0
    assert min(agree) > 0.99, agree  # measured: 0.997
    # what a user exports from the working run: the refined masks and the overlays at the original size
    export = tmp_path / "export"
    res = zsad("export-maps", str(tmp_path / "sam-working" / "r"), "--out", str(export), "--overlay")
    assert res.returncode == 0, res.stderr[-2000:]
    overlays = sorted(export.rglob("*_overlay.png"))
    refined = sorted(export.rglob("*_refined.png"))
    assert len(overlays) == 3 and len(refined) == int(work["refined"].sum())
    for path in overlays + refined:
        with Image.open(path) as img:
            assert max(img.size) == 1280 and sorted(img.size) == [960, 1280], (path.name, img.size)


# ------------------------------------------------------------------ vvv: foreground and tiles (measured 2026-12-07)
#: vvv on the tiny models with tiles of at least 640 px: the tiny CLIP's largest input (160 px) in the
#: smallest tile is a scale of 1/4, so working decodes below the full size (vvv's own 352-px tiles
#: with its 448-px input need every pixel)
VVV_SETS = ["tiling.min_tile=640"]


@pytest.fixture(scope="module")
def vvv_data(tmp_path_factory):
    """Four 960 x 1280 multi-instance images (two with a defect and its ground truth) as JPEGs, MVTec layout."""
    from pipeline.synthetic import make_multi_instance_dataset

    root = tmp_path_factory.mktemp("vvv-working")
    make_multi_instance_dataset(str(root / "png"), n_good=2, n_bad=2, size=(960, 1280), instances=(2, 3), seed=4)
    for path in (root / "png").rglob("*.png"):
        rel = path.relative_to(root / "png")
        out = root / "in" / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in rel.parts:
            out.write_bytes(path.read_bytes())
        else:
            Image.open(path).convert("RGB").save(out.with_suffix(".jpg"), quality=92)
    return root


def _vvv(root, name, mode, sets, *flags, monkeypatch=None):
    """vvv.yaml on the tiny models in ``mode``; its tables, and the sizes the decode stage decoded to
    (when the run is in this process)."""
    import pipeline.stages.decode as decode_stage

    decoded = []
    if monkeypatch is not None:
        real = decode_stage.decode_working

        def spy(data, max_pixels, working):
            image, original = real(data, max_pixels, working)
            decoded.append((image.shape[:2], original))
            return image, original

        monkeypatch.setattr(decode_stage, "decode_working", spy)
    out = root / f"{name}-{mode}"
    args = [a for s in [*VVV_SETS, *sets] for a in ("--set", s)]
    res = zsad("run", "jobs/vvv.yaml", "--input", str(root / "in"), "--output", str(out), "--run-id", "r", *TINY,
               "--executor", "local", "--set", f"decode.resolution={mode}", *args, *flags, report=False)
    assert res.returncode == 0, res.stderr[-3000:]
    tables = {t: pd.read_parquet(out / "r" / t) for t in ("scores", "tiles", "foreground", "masks")}
    tables["metrics"] = pd.read_parquet(out / "r" / "metrics") if (out / "r" / "metrics").exists() else None
    return tables, decoded


def _decoded_below_the_full_size(sets, decoded, expect):
    """The plan's working size for a 960 x 1280 image is ``expect``, and the run's decode stage (when
    it ran in this process) decoded every image to it, keeping the original size."""
    import os

    from pipeline.config import load_spec
    from pipeline.stages.decode import working_size

    spec = load_spec("jobs/vvv.yaml", [*VVV_SETS, *sets, "decode.resolution=working"], tiny=True)
    assert working_size(spec).size(960, 1280) == expect
    if not os.environ.get("ZSAD_TESTS_SUBPROCESS"):
        assert decoded and set(decoded) == {(expect, (960, 1280))}, decoded


def _foreground_at_the_original_size(work, exact):
    """The foreground table in original pixels: masks at 960 x 1280 with the components' areas, and
    the IoU of each working mask with the exact one."""
    import json

    from pipeline.ops import rle

    fw = work["foreground"].set_index("image_id").sort_index()
    fe = exact["foreground"].set_index("image_id").sort_index()
    assert list(fw.index) == list(fe.index) and (fw["n_components"] == fe["n_components"]).all()
    ious, box_dev = [], 0
    for image_id, row in fw.iterrows():
        mask = rle.decode(json.loads(row.foreground_rle))
        ref = rle.decode(json.loads(fe.loc[image_id].foreground_rle))
        assert mask.shape == ref.shape == (960, 1280) and mask.sum() == sum(row.component_areas)
        boxes = np.array([list(b) for b in row.component_boxes]).reshape(-1, 4)
        assert ((boxes[:, 0] < boxes[:, 2]) & (boxes[:, 2] <= 1280) & (boxes[:, 1] < boxes[:, 3])
                & (boxes[:, 3] <= 960) & (boxes >= 0).all(axis=1)).all()
        want = np.array([list(b) for b in fe.loc[image_id].component_boxes]).reshape(-1, 4)
        box_dev = max(box_dev, int(np.abs(boxes - want).max()) if len(boxes) else 0)
        ious.append(float((mask & ref).sum() / max(1, (mask | ref).sum())))
    return ious, box_dev


def test_vvv_with_larger_tiles_decodes_smaller_and_keeps_foreground_and_tiles_in_original_pixels(vvv_data,
                                                                                                monkeypatch):
    """vvv (classical foreground) in working against exact: the images decode at a quarter of their
    size (1/4 is what the tiny model's 160-px input needs in the smallest 640-px tile), the foreground
    masks, component boxes and tiles come out in original pixels within a few pixels of exact's,
    and the scores, maps and evaluation within the measured deviation."""
    sets = ["foreground.kind=classical"]
    exact, _ = _vvv(vvv_data, "classical", "exact", sets)
    work, decoded = _vvv(vvv_data, "classical", "working", sets, monkeypatch=monkeypatch)
    _decoded_below_the_full_size(sets, decoded, (240, 320))
    sw = work["scores"].set_index("image_id").sort_index()
    se = exact["scores"].set_index("image_id").sort_index()
    assert (sw["status"] == "ok").all() and (sw["scoring_mode"] == "tiles").all()
    assert (sw["height"] == 960).all() and (sw["width"] == 1280).all()
    assert list(sw["n_components"]) == list(se["n_components"]) and list(sw["n_tiles"]) == list(se["n_tiles"])
    ious, box_dev = _foreground_at_the_original_size(work, exact)
    assert min(ious) > 0.93 and box_dev <= 8, (ious, box_dev)  # measured: IoU 0.967 and up, boxes 3 px
    key = ["image_id", "component_id", "x0", "y0"]
    tw, te = work["tiles"].sort_values(key), exact["tiles"].sort_values(key)
    assert len(tw) == len(te) == sw["n_tiles"].sum()
    assert (tw["x1"] - tw["x0"] >= 640).all() and (tw["x1"] <= 1280).all() and (tw["y1"] <= 960).all()
    xy = ["x0", "y0", "x1", "y1"]
    assert np.abs(tw[xy].to_numpy() - te[xy].to_numpy()).max() <= 4  # measured: 1 px
    assert np.abs(tw["tile_score"].to_numpy() - te["tile_score"].to_numpy()).max() < 0.01  # measured: 2.2e-3
    assert np.abs(sw["score"] - se["score"]).max() < 0.01  # measured: 2.1e-3
    mw = work["masks"].set_index("image_id")
    me = exact["masks"].set_index("image_id")
    for image_id, row in mw.iterrows():
        ref = me.loc[image_id]
        assert (row.map_height, row.map_width) == (ref.map_height, ref.map_width) == (48, 64)  # the original's shape
        a = heatmap.decode_png16(row.map_png, row.map_min, row.map_max)
        b = heatmap.decode_png16(ref.map_png, ref.map_min, ref.map_max)
        assert b.std() > 1e-2 and np.abs(a - b).mean() < 0.01 and np.abs(a - b).max() < 0.06  # measured: 1.8e-3, 1.5e-2
    # evaluated against the ground truth at the original size in both modes
    mw, me = work["metrics"].set_index("category"), exact["metrics"].set_index("category")
    assert (mw["n_pixels"] == me["n_pixels"]).all()
    assert abs(mw.loc["pills", "pixel_auroc"] - me.loc["pills", "pixel_auroc"]) < 0.02  # measured: 7.5e-4


def test_vvv_sam_foreground_runs_at_the_working_size_and_is_stored_at_the_original_size(vvv_data, monkeypatch):
    """vvv's own SAM foreground in working against exact (two images): SAM's 1024-px long side
    decides the size (768 x 1024); the union of the kept SAM masks comes out at 960 x 1280 and agrees
    with exact's (the tiny SAM's random masks: every mask kept, min_inside 0.01)."""
    sets = ["data.max_images=2", "foreground.min_inside=0.01", "foreground.points_per_side=2",
            "foreground.pred_iou_thresh=0", "foreground.stability_score_thresh=0"]
    exact, _ = _vvv(vvv_data, "sam", "exact", sets, "--no-evaluate")
    work, decoded = _vvv(vvv_data, "sam", "working", sets, "--no-evaluate", monkeypatch=monkeypatch)
    _decoded_below_the_full_size(sets, decoded, (768, 1024))
    sw = work["scores"].set_index("image_id").sort_index()
    se = exact["scores"].set_index("image_id").sort_index()
    assert (sw["status"] == "ok").all() and (sw["sam_model"] == "tiny").all() and (sw["n_components"] >= 1).all()
    ious, box_dev = _foreground_at_the_original_size(work, exact)
    assert min(ious) > 0.97 and box_dev <= 8, (ious, box_dev)  # measured: IoU 0.994, boxes equal
    assert np.abs(sw["score"] - se["score"]).max() < 0.01  # measured: 3.8e-4
