"""GPU execution paths through real runs on a local Ray (CPU): out-of-memory injected into the CLIP
and SAM pools (ZSAD_INJECT_OOM, read by the actors), and the fused model pool (runtime.fuse_models)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.synthetic import make_dataset, make_multi_instance_dataset

pytestmark = pytest.mark.integration
ZSAD = str(Path(sys.executable).with_name("zsad"))
REPO = Path(__file__).resolve().parents[2]
TINY = ["--set", "clip.model=zsad-tiny", "--set", "clip.weights=null", "--set", "allow_random_weights=true",
        "--set", "sam.model=tiny", "--set", "sam.weights=null", "--set", "maps.map_size=32", "--set", "report.enabled=false",
        "--set", "max_error_rate=1.0"]


def _zsad(*args, env=None):
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(env or {})
    return subprocess.run([ZSAD, *args], cwd=REPO, capture_output=True, text=True, env=full, timeout=600)


def test_out_of_memory_splits_batches_and_fails_only_the_images_that_do_not_fit_alone(tmp_path):
    data = tmp_path / "in"
    for category, size in (("small", 48), ("medium", 80), ("large", 112)):  # 2304 / 6400 / 12544 pixels
        make_dataset(str(data), categories=(category,), n_good=2 if category != "small" else 4, n_bad=1, size=size, seed=1)
    # CLIP: three small images fit together, a batch of 4 does not, a large image never; SAM's
    # refinement: a medium image does not fit
    env = {"ZSAD_INJECT_OOM": "clip_score:9000,sam_refine:5000"}
    res = _zsad("run", "jobs/clip_sam.yaml", "--input", str(data), "--output", str(tmp_path / "out"), "--run-id", "o", *TINY,
                "--set", "pixel.weights=null", "--set", "pixel.layers=[2,4,6,8]", "--set", "pixel.image_size=128",
                "--set", "resources.clip_score.batch_size=8", "--set", "sam_refine.steps=1", "--no-evaluate", env=env)
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
    make_multi_instance_dataset(str(tmp_path / "in"), n_good=1, n_bad=2, size=(128, 160), seed=4)
    res = _zsad("run", "jobs/vvv.yaml", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--run-id", "f",
                "--layout", "mvtec", *TINY, "--set", "runtime.fuse_models=true", "--set", "foreground.points_per_side=4",
                "--set", "pixel.scales=[128]", "--set", "pixel.grid=8", "--set", "pixel.gem_depth=2",
                "--set", "tiling.min_tile=96", "--set", "tiling.tile_map_size=32", "--set", "sam_refine={steps: 1}",
                "--set", "resources.clip_score.num_cpus=0.5",
                *[x for stage in ("decode", "encode") for x in ("--set", f"resources.{stage}.num_cpus=0.1")],
                "--no-evaluate")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "f" / "run.json").read_text())
    assert [s["stage"] for s in record["plan"]] == ["decode", "models", "encode"]
    assert record["plan"][1]["fused"] == ["foreground", "tiling", "clip_score", "aggregate", "sam_refine"]
    assert "models: 0.5 GPU asked but this machine's Ray has no GPU: running models on CPU" in res.stderr
    scores = pd.read_parquet(tmp_path / "out" / "f" / "scores")
    assert (scores["status"] == "ok").all() and len(scores) == 3
    assert scores["foreground_ms"].notna().all() and scores["sam_refine_ms"].notna().all()
    assert scores["n_tiles"].min() >= 1
