"""What a new user hit (issue 11), end to end with the CLI and a local Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.synthetic import make_dataset

pytestmark = pytest.mark.integration
ZSAD = str(Path(sys.executable).with_name("zsad"))
REPO = Path(__file__).resolve().parents[2]


def _zsad(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([ZSAD, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


def test_auto_evaluation_runs_in_the_runs_own_ray_session(tmp_path):
    """Defect 10: a labelled run evaluated itself in a second local Ray (about 45 s more)."""
    make_dataset(str(tmp_path / "in"), categories=("widget",), n_good=2, n_bad=2, size=48)
    res = _zsad("run", "jobs/smoke.yaml", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--run-id", "ev")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("starting a local Ray instance") == 1, res.stderr[-3000:]
    assert (tmp_path / "out" / "ev" / "metrics.md").exists() and "metrics:" in res.stdout
    assert res.stdout.index("run ev: succeeded") < res.stdout.index("metrics:")  # summary first, then the metrics
    assert json.loads((tmp_path / "out" / "ev" / "run.json").read_text())["status"] == "succeeded"
