"""decode.resolution: working end to end (issue 31): the default preset on the tiny model, on large
generated JPEGs, through the in-process executor, against the same run with exact: the same tables
and map sizes (the original size), scores and maps within the documented deviation."""

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
