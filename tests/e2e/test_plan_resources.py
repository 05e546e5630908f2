"""Resources of the declared plan on a machine without GPU (a local Ray): a task stage never asks
for a GPU, and a request no node can satisfy fails at once with the stage named. Both need Ray:
the resource requests of the stages are what Ray is asked for."""

import json
import time

import pandas as pd
import pytest

from pipeline.synthetic import make_dataset, make_multi_instance_dataset
from tests.helpers.zsad import TINY, zsad

pytestmark = pytest.mark.integration


def _zsad(*args, timeout=600):
    return zsad(*args, timeout=timeout, ray=True)


def test_vvv_with_classical_foreground_completes_without_gpu(tmp_path):
    """The preset asks for 0.5 GPU for the foreground and the CLIP pools. With the classical
    foreground the foreground stage is CPU tasks (it used to ask Ray for {'CPU': 1, 'GPU': 0.5} and
    wait for the 30-minute stall timeout); the CLIP pool falls back to the CPU. Needs Ray: what is
    checked is what the stages ask a local Ray without GPU for."""
    make_multi_instance_dataset(str(tmp_path / "in"), n_good=1, n_bad=1, size=(160, 224), seed=2)
    res = _zsad("run", "jobs/vvv.yaml", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                "--run-id", "nogpu", "--layout", "mvtec", "--no-evaluate", *TINY, "--set", "foreground.kind=classical",
                # the preset's GPU requests, which --tiny turns off
                "--set", "resources.foreground.num_gpus=0.5", "--set", "resources.clip_score.num_gpus=0.5", "--verbose")
    assert res.returncode == 0, res.stderr[-4000:]
    # --verbose: Ray's own lines reach the terminal too (without it they are only in RUN/logs/)
    assert "execution finished" in res.stderr and "actor ready" in res.stderr
    assert "resources.foreground.num_gpus=0.5 is not used: foreground runs as CPU tasks" in res.stderr
    assert "running clip_score on CPU" in res.stderr
    assert "No available node types can fulfill" not in res.stderr
    run = tmp_path / "out" / "nogpu"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "succeeded" and record["counts"]["ok"] == 2
    assert [s["stage"] for s in record["plan"]] == [
        "decode",
        "foreground",
        "tiling",
        "clip_score",
        "aggregate",
        "encode",
    ]
    assert (pd.read_parquet(run / "scores")["scoring_mode"] == "tiles").all()


def test_a_request_no_node_can_satisfy_fails_at_once_naming_the_stage(tmp_path):
    """Needs Ray: the check is of a local Ray's resources against the plan's requests."""
    make_dataset(str(tmp_path / "in"), categories=("widget",), n_good=1, n_bad=1, size=48)
    t0 = time.monotonic()
    res = _zsad(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "huge",
        "--no-evaluate",
        "--set",
        "resources.clip_score.num_cpus=64",
        timeout=300,
    )
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, res.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "huge" / "run.json").read_text())
    assert record["status"] == "failed"
    assert "stage 'clip_score' asks for {'CPU': 64.0} per actor" in record["reason"]
    assert "resources.clip_score" in record["reason"] and "reason:" in res.stdout
    assert elapsed < 120, f"took {elapsed:.0f} s: it should fail at start-up, not wait"
