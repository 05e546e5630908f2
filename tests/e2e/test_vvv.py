"""jobs/vvv.yaml end to end with the tiny CLIP (and the tiny SAM), on a generated multi-instance
dataset: scores, masks, foreground and tiles tables. In-process executor (tests/helpers/zsad.py)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.ops import rle
from pipeline.synthetic import make_multi_instance_dataset
from tests.helpers.zsad import TINY as _TINY
from tests.helpers.zsad import ok, zsad

pytestmark = pytest.mark.integration
TINY = [*_TINY, "--set", "pixel.scales=[128]", "--set", "maps.map_size=256"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vvv")
    info = make_multi_instance_dataset(str(root / "in"), n_good=3, n_bad=3, size=(192, 256), seed=1)
    return root, info


def _run(root, run_id, *extra):
    ok(zsad("run", "jobs/vvv.yaml", "--input", str(root / "in"), "--output", str(root / "out"), "--run-id", run_id,
            *TINY, *extra))
    return root / "out" / run_id


def test_vvv_preset_with_classical_foreground_writes_every_table(data):
    root, info = data
    run = _run(root, "classical", "--set", "foreground.kind=classical")
    scores = pd.read_parquet(run / "scores")
    tiles = pd.read_parquet(run / "tiles")
    fg = pd.read_parquet(run / "foreground")
    masks = pd.read_parquet(run / "masks")
    assert len(scores) == len(fg) == len(masks) == 6 and (scores["status"] == "ok").all()
    assert (scores["scoring_mode"] == "tiles").all()
    by_uri = {str(Path(info["root"]) / im["path"]): im for im in info["images"]}
    for row in scores.itertuples():
        meta = by_uri[row.uri]
        assert row.n_components == meta["n_instances"]
        mine = tiles[tiles["image_id"] == row.image_id]
        assert len(mine) == row.n_tiles and set(mine["component_id"]) == set(range(row.n_components))
        comp = mine.groupby("component_id")["tile_score"].mean().sort_values(ascending=False)
        k = max(1, int(np.ceil(0.25 * len(comp))))
        assert row.score == pytest.approx(comp.iloc[:k].mean(), abs=1e-9)  # the top-25% rule, from the table
        np.testing.assert_allclose(mine["component_score"], mine["component_id"].map(comp), atol=1e-12)
        assert (mine["x0"] >= 0).all() and (mine["x1"] <= 256).all() and (mine["y1"] <= 192).all()
    for row in fg.itertuples():
        mask = rle.decode(json.loads(row.foreground_rle))
        assert mask.shape == (192, 256) and mask.sum() == sum(row.component_areas)
        assert len(row.component_boxes) == row.n_components
    assert (masks["map_height"] == 192).all()  # map_size 256: long side 256 keeps the 192 x 256 image size
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["random_weights"] is True and manifest["tables"]["tiles"] and manifest["tables"]["foreground"]
    assert scores["sam_model"].isna().all()  # classical: SAM did not run
    assert (run / "metrics.md").exists()  # mvtec layout: evaluated


def test_vvv_preset_with_tiny_sam(data):
    root, _ = data
    run = _run(root, "sam", "--set", "foreground.points_per_side=4", "--set", "foreground.pred_iou_thresh=0",
               "--set", "foreground.stability_score_thresh=0", "--no-evaluate")
    scores = pd.read_parquet(run / "scores")
    fg = pd.read_parquet(run / "foreground")
    tiles = pd.read_parquet(run / "tiles")
    assert (scores["status"] == "ok").all() and (fg["kind"] == "sam_dis").all()
    assert (fg["n_sam_masks"] >= 1).all() and (fg["n_kept_masks"] <= fg["n_sam_masks"]).all()
    assert set(scores["scoring_mode"]) <= {"tiles", "whole_image_fallback"}
    assert (scores["sam_model"] == "tiny").all() and (scores["sam_weights"] == "random").all()
    assert tiles.groupby("image_id").size().sum() == scores["n_tiles"].sum()
    fallback = scores[scores["scoring_mode"] == "whole_image_fallback"]
    assert (fallback["n_tiles"] == 1).all()
    assert (tiles[tiles["image_id"].isin(fallback["image_id"])]["reason"] == "whole_image").all()
