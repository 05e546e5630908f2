"""GPU execution paths through real runs (CPU): out-of-memory injected into the CLIP and SAM stages
(ZSAD_INJECT_OOM, read by the model stages; in-process executor), and the fused model pool
(runtime.fuse_models) on a local Ray."""

import json

import pandas as pd
import pytest

from pipeline.synthetic import make_dataset, make_multi_instance_dataset
from tests.helpers.zsad import TINY as _TINY
from tests.helpers.zsad import zsad as _zsad

pytestmark = pytest.mark.integration
TINY = [*_TINY, "--set", "maps.map_size=32", "--set", "max_error_rate=1.0"]


def test_out_of_memory_splits_batches_and_fails_only_the_images_that_do_not_fit_alone(tmp_path):
    data = tmp_path / "in"
    for category, size in (("small", 48), ("medium", 80), ("large", 112)):  # 2304 / 6400 / 12544 pixels
        make_dataset(
            str(data), categories=(category,), n_good=2 if category != "small" else 4, n_bad=1, size=size, seed=1
        )
    # CLIP: three small images fit together, a batch of 4 does not, a large image never; SAM's
    # refinement: a medium image does not fit
    env = {"ZSAD_INJECT_OOM": "clip_score:9000,sam_refine:5000"}
    res = _zsad(
        "run",
        "jobs/clip_sam.yaml",
        "--input",
        str(data),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "o",
        *TINY,
        "--set",
        "resources.clip_score.batch_size=8",
        "--set",
        "sam_refine.steps=1",
        "--no-evaluate",
        env=env,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = tmp_path / "out" / "o"
    scores = pd.read_parquet(run / "scores")
    errors = pd.read_parquet(run / "errors")
    by_category = scores.groupby("category")["status"].apply(set).to_dict()
    assert by_category == {"small": {"ok"}, "medium": {"error"}, "large": {"error"}}
    assert sorted(errors["uri"]) == sorted(scores.loc[scores["status"] == "error", "uri"])
    assert set(errors["error_type"]) == {"OutOfMemory"}
    for uri, stage in zip(errors["uri"], errors["stage"]):
        assert stage == ("clip_score" if "/large/" in uri else "sam_refine"), (uri, stage)
    # the five small images (11520 pixels together) all succeeded: their batches were split
    assert json.loads((run / "run.json").read_text())["status"] == "succeeded"


def test_fused_model_pool_runs_foreground_clip_and_refinement_in_one_actor(tmp_path):
    """Needs Ray: the fused stage is one actor pool, whose GPU request falls back on a Ray without GPUs."""
    make_multi_instance_dataset(str(tmp_path / "in"), n_good=1, n_bad=2, size=(128, 160), seed=4)
    res = _zsad(
        "run",
        "jobs/vvv.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "f",
        "--layout",
        "mvtec",
        *TINY,
        "--set",
        "runtime.fuse_models=true",
        "--set",
        "foreground.points_per_side=4",
        "--set",
        "pixel.scales=[128]",
        "--set",
        "sam_refine={steps: 1}",
        "--set",
        "resources.clip_score.num_cpus=0.5",
        "--set",
        "resources.clip_score.num_gpus=0.5",
        *[x for stage in ("decode", "encode") for x in ("--set", f"resources.{stage}.num_cpus=0.1")],
        "--no-evaluate",
        ray=True,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "f" / "run.json").read_text())
    assert [s["stage"] for s in record["plan"]] == ["decode", "models", "encode"]
    assert record["plan"][1]["fused"] == ["foreground", "tiling", "clip_score", "aggregate", "sam_refine"]
    assert "models: 0.5 GPU asked but this machine's Ray has no GPU: running models on CPU" in res.stderr
    scores = pd.read_parquet(tmp_path / "out" / "f" / "scores")
    assert (scores["status"] == "ok").all() and len(scores) == 3
    assert scores["foreground_ms"].notna().all() and scores["sam_refine_ms"].notna().all()
    assert scores["n_tiles"].min() >= 1
