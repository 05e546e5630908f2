"""The whole-category passes survive a driver killed in the middle of them (issue 28), on the tiny CLIP
with jobs/musc.yaml and the in-process executor (the passes are the driver's and the executor's code;
Ray is not what is tested here):

- killed during the pool pass, as soon as the first category's pool manifest exists: the resumed run
  reuses the complete pools (counted in run.json), builds the others, and its scores equal an
  uninterrupted run's;
- killed during the RsCIN pass, as soon as the first category's side table exists: the resumed run
  has every shard already, reuses that side table (counted), and its scores equal the same run's.

The driver is stopped with SIGSTOP the moment the watched file appears (so the state is what it was
then), checked, then killed with SIGKILL: no handler runs, as when a head node dies."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from pipeline.io import fs as fsio
from pipeline.synthetic import make_dataset
from tests.e2e.test_cli_run import read_table
from tests.helpers.zsad import TINY, ok, popen, zsad

pytestmark = pytest.mark.integration

CATS = ("gear", "plate", "tile")
SETS = [
    "--set",
    "maps.map_size=32",
    "--set",
    "pixel.layers=[2,4]",
    "--set",
    "pixel.image_size=64",
    "--set",
    "pixel.degrees=[1,3]",
    "--set",
    "resources.clip_score.batch_size=1",
    "--set",
    "resources.decode.batch_size=1",
]


def _args(data, out, run_id):
    return [
        "run",
        "jobs/musc.yaml",
        "--input",
        str(data),
        "--output",
        str(out),
        "--run-id",
        run_id,
        *TINY,
        *SETS,
        "--no-evaluate",
    ]


def _stop_when(proc: subprocess.Popen, found, timeout: float = 120.0) -> None:
    """SIGSTOP ``proc`` as soon as ``found()`` is true (polled every 5 ms)."""
    t0 = time.monotonic()
    while not found():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the watched file appeared"
        assert time.monotonic() - t0 < timeout, "the watched file never appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _scores(run_dir):
    return read_table(fsio.join(str(run_dir), "scores")).to_pandas().set_index("image_id").sort_index()


def test_a_driver_killed_in_the_pool_pass_or_the_rscin_pass_resumes_to_the_same_scores(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_dataset(str(data), categories=CATS, n_good=4, n_bad=3, size=64)  # 7 images per category: pools of 7
    ok(zsad(*_args(data, out, "whole")))
    whole = _scores(out / "whole")
    assert whole["score_rscin"].notna().all() and len(whole) == 21

    # 1. killed in the pool pass: the first category's pool is complete, the last one's is not
    proc = popen(*_args(data, out, "pools"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifests = [out / "pools" / "pools" / c / "manifest.json" for c in CATS]
    try:
        _stop_when(proc, lambda: manifests[0].exists())
        complete = [c for c, m in zip(CATS, manifests) if m.exists()]
        assert complete and complete != list(CATS), complete
        assert not (out / "pools" / "_done").exists()  # no image scored yet
    finally:
        _kill(proc)
    res = ok(zsad("resume", str(out / "pools"), "--no-evaluate"))
    record = json.loads((out / "pools" / "run.json").read_text())
    assert record["status"] == "succeeded", res.stderr[-2000:]
    mu = record["mutual"]
    assert mu["pools_reused"] == complete and mu["pools_built"] == sorted(set(CATS) - set(complete))
    assert all(mu["pools"][c]["built"] is (c not in complete) for c in CATS)
    assert sum(mu["pool_loads_by_actor"].values()) == len(CATS)  # input grouped by category: each pool loaded once
    got = _scores(out / "pools")
    np.testing.assert_allclose(got["score_mutual"], whole["score_mutual"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["score_rscin"], whole["score_rscin"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(got["score"], got["score_rscin"])

    # 2. killed in the RsCIN pass: every shard is done, the first category's side table is written
    proc = popen(*_args(data, out, "rscin"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    side = out / "rscin" / "rescore" / "rscin" / CATS[0]
    try:
        _stop_when(proc, lambda: side.exists() and any(p.name.startswith("chunk-") for p in side.iterdir()))
        assert (out / "rscin" / "_done").exists() and not (out / "rscin" / "run.json").exists()
        before = _scores(out / "rscin")
        assert before["score_rscin"].isna().all()  # no shard rewritten yet
    finally:
        _kill(proc)
    ok(zsad("resume", str(out / "rscin"), "--no-evaluate"))
    record = json.loads((out / "rscin" / "run.json").read_text())
    assert record["status"] == "succeeded" and record["mutual"]["pools_built"] == []  # every image was scored already
    rscin = record["mutual"]["rscin_pass"]
    assert CATS[0] in rscin["categories_reused"] and rscin["images"] == 21 and record["mutual"]["k_list"] == [1, 2, 3]
    assert rscin["k_list_from"] == "layout mvtec"
    got = _scores(out / "rscin")
    np.testing.assert_allclose(got["score_rscin"], whole["score_rscin"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(got["score"], got["score_rscin"])
