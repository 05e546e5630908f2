"""The CLIP-SAM cascade preset end to end with the tiny CLIP and tiny SAM: refined masks, the
documented columns, the evaluation, one step on S3 input and output, and refinement after VVV's
foreground and tiling. In-process executor (tests/helpers/zsad.py): what is checked is the
refinement's data, not Ray."""

import json
import os

import pandas as pd
import pytest

from pipeline.ops import rle
from pipeline.synthetic import make_dataset, make_multi_instance_dataset
from tests.helpers.zsad import TINY
from tests.helpers.zsad import zsad as _zsad

pytestmark = pytest.mark.integration


def test_clip_sam_refines_every_map_and_evaluates(tmp_path):
    make_dataset(str(tmp_path / "in"), categories=("widget",), n_good=2, n_bad=3, size=96)
    res = _zsad("run", "jobs/clip_sam.yaml", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                "--run-id", "c", *TINY, report=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = tmp_path / "out" / "c"
    masks = pd.read_parquet(run / "masks")
    scores = pd.read_parquet(run / "scores")
    assert masks["refined"].all() and (masks["map_max"] == 4.0).all()
    for r in masks.itertuples():
        info = json.loads(r.refine_info)
        assert info["steps"] == 3 and len(info["iou"]) == 3 and len(info["positive"]) >= 1 and info["box"] is not None
        assert rle.decode(json.loads(r.refine_rle)).shape == (96, 96)
    assert scores["sam_refine_ms"].notna().all() and (scores["sam_model"] == "tiny").all()
    record = json.loads((run / "run.json").read_text())
    assert record["refine"] == {"refined": 5, "kept": 0, "failed": 0}
    assert [s["stage"] for s in record["plan"]] == ["decode", "clip_score", "sam_refine", "encode"]
    assert pd.read_parquet(run / "metrics")["pixel_auroc"].notna().all()


def test_one_step_with_input_and_output_on_s3(tmp_path, s3_bucket, s3_env):
    from pipeline.io import fs as fsio

    storage = fsio.storage_options()
    make_dataset(f"s3://{s3_bucket}/data", categories=("gear",), n_good=1, n_bad=2, size=64, storage=storage)
    env = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    res = _zsad(
        "run",
        "jobs/clip_sam.yaml",
        "--input",
        f"s3://{s3_bucket}/data",
        "--output",
        f"s3://{s3_bucket}/runs",
        "--run-id",
        "s",
        *TINY,
        "--set",
        "sam_refine.steps=1",
        env=env,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    masks = pd.read_parquet(f"s3://{s3_bucket}/runs/s/masks", storage_options=storage)
    infos = [json.loads(i) for i in masks["refine_info"].dropna()]
    assert infos and all(i["steps"] == 1 and i["box"] is None for i in infos)
    assert pd.read_parquet(f"s3://{s3_bucket}/runs/s/metrics", storage_options=storage)["pixel_auroc"].notna().all()


def test_refinement_after_the_sam_foreground_and_tiling_of_vvv(tmp_path):
    """VVV's SAM foreground hands its embedding to the refinement through the row (sam_embedding)."""
    make_multi_instance_dataset(str(tmp_path / "in"), n_good=1, n_bad=1, size=(160, 224), seed=4)
    res = _zsad(
        "run",
        "jobs/vvv.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "v",
        "--layout",
        "mvtec",
        *TINY,
        "--set",
        "foreground.points_per_side=4",
        "--set",
        "pixel.scales=[128]",
        "--set",
        "sam_refine={steps: 2}",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "v" / "run.json").read_text())
    assert [s["stage"] for s in record["plan"]] == [
        "decode",
        "foreground",
        "tiling",
        "clip_score",
        "aggregate",
        "sam_refine",
        "encode",
    ]
    assert record["status"] == "succeeded" and record["refine"]["failed"] == 0
    masks = pd.read_parquet(tmp_path / "out" / "v" / "masks")
    assert masks["refined"].sum() == record["refine"]["refined"]
