"""Resume after the driver is SIGKILLed mid-run: exactly-once rows in every output table; incremental
runs; the stall watchdog; resume with storage overrides. In-process executor
(tests/helpers/zsad.py) except where Ray is what is checked (each such test says why)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers.badfiles import write_good_images
from tests.helpers.procs import ray_pids, stop_new_ray_processes
from tests.helpers.zsad import env_without_ray, popen, zsad

pytestmark = pytest.mark.integration


def test_sigkill_then_resume_is_exactly_once(tmp_path):
    """Needs Ray: the driver is killed with its local Ray and actors mid-stream (what a lost head
    node does); the resume then runs in-process, as a resume may use the other executor."""
    write_good_images(tmp_path / "in" / "parts", 240, size=(48, 48))
    before = ray_pids()
    out = tmp_path / "out"
    done_dir = out / "r1" / "_done"
    proc = popen(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--run-id",
        "r1",
        "--set",
        "shard_size=40",
        "--set",
        "resources.clip_score.batch_size=8",
        "--set",
        "resources.decode.batch_size=8",
        ray=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        n = len(list(done_dir.glob("shard-*.json"))) if done_dir.exists() else 0
        if 1 <= n < 6:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = n
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    stop_new_ray_processes(before, session=proc.pid)  # the killed driver's local Ray, nobody else's
    assert killed_at is not None, "the run finished (or hung) before it could be killed midway"
    assert not (out / "r1" / "run.json").exists()

    again = zsad(
        "run", "jobs/smoke.yaml", "--input", str(tmp_path / "in"), "--output", str(out), "--run-id", "r1", timeout=300
    )
    assert again.returncode == 2 and "was interrupted" in again.stderr

    res = zsad("resume", str(out / "r1"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming:" in res.stderr
    inputs = set(pd.read_parquet(out / "r1" / "inputs.parquet")["image_id"])
    assert len(inputs) == 240
    for table in ("scores", "errors", "masks"):
        df = pd.read_parquet(out / "r1" / table)
        assert df["image_id"].is_unique, table
        if table != "errors":
            assert set(df["image_id"]) == inputs, table
    manifest = json.loads((out / "r1" / "run.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["counts"]["images"] == 240 and manifest["counts"]["ok"] == 240
    assert manifest["shards"] == {"size": 40, "count": 6, "done": 6}
    again = zsad("resume", str(out / "r1"), timeout=300)  # a retry loop's resume of the finished run: nothing to do
    assert again.returncode == 0 and "run r1 already succeeded" in again.stdout and "nothing to do" in again.stdout
    assert json.loads((out / "r1" / "run.json").read_text()) == manifest


def test_incremental_run_scores_only_new_and_changed_files(tmp_path):
    paths = write_good_images(tmp_path / "in" / "parts", 20, size=(40, 40))
    out = tmp_path / "out"
    first = zsad(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--run-id",
        "night1",
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    added = write_good_images(tmp_path / "new", 5, size=(40, 40), seed=100)
    for i, p in enumerate(added):
        p.rename(tmp_path / "in" / "parts" / f"added_{i}.png")
    for p in paths[:2]:  # modified in place: new size and mtime
        write_good_images(tmp_path / "mod", 1, size=(44, 44), seed=500)[0].replace(p)
    second = zsad(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--run-id",
        "night2",
        "--skip-scored",
        str(out),
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    scored = set(Path(u).name for u in pd.read_parquet(out / "night2" / "scores")["uri"])
    assert scored == {f"added_{i}.png" for i in range(5)} | {paths[0].name, paths[1].name}
    assert "18 of 25 images already scored" in second.stderr


def test_stall_timeout_fails_the_run_instead_of_hanging(tmp_path):
    """Needs Ray: the watchdog must stop a run whose Ray task hangs in a worker (a read that never returns)."""
    good = write_good_images(tmp_path / "imgs", 3, size=(40, 40))
    fifo = tmp_path / "imgs" / "stuck.png"
    os.mkfifo(fifo)  # reading it blocks forever: nobody ever writes
    manifest = tmp_path / "inputs.csv"
    manifest.write_text("uri,category\n" + "".join(f"{p},parts\n" for p in [*good, fifo]))
    before = ray_pids()
    t0 = time.monotonic()
    proc = popen(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(manifest),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "stall",
        "--set",
        "stall_timeout_s=15",
        "--set",
        "resources.decode.batch_size=1",
        ray=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = proc.communicate(timeout=240)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    elapsed = time.monotonic() - t0
    stop_new_ray_processes(before, session=proc.pid)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "stall_timeout_s" in res.stderr + res.stdout
    manifest_json = json.loads((tmp_path / "out" / "stall" / "run.json").read_text())
    assert manifest_json["status"] == "failed" and "StallError" in manifest_json["reason"]
    assert elapsed < 150


def test_resume_takes_storage_overrides_only(tmp_path, s3_bucket, s3_env):
    """Issue 11, defect 9: a run whose S3 settings came from --set storage.* can be resumed with the
    same overrides (and nothing else: other keys would change results)."""
    from pipeline.io import fs as fsio
    from pipeline.synthetic import make_dataset

    storage = fsio.storage_options()
    make_dataset(f"s3://{s3_bucket}/data", categories=("gear",), n_good=2, n_bad=2, size=48, storage=storage)
    env = {k: v for k, v in env_without_ray().items() if not k.startswith("AWS_")}  # settings only through --set
    sets = [
        "--set",
        f"storage.endpoint_url={s3_env['endpoint_url']}",
        "--set",
        f"storage.access_key_id={s3_env['access_key_id']}",
        "--set",
        f"storage.secret_access_key={s3_env['secret_access_key']}",
        "--set",
        f"storage.region={s3_env['region']}",
    ]
    run = f"s3://{s3_bucket}/runs/r1"
    res = _clean(
        env,
        "run",
        "jobs/smoke.yaml",
        "--input",
        f"s3://{s3_bucket}/data",
        "--output",
        f"s3://{s3_bucket}/runs",
        "--run-id",
        "r1",
        "--no-evaluate",
        "--set",
        "shard_size=2",
        *sets,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    fs, _ = fsio.filesystem(run, storage)
    fs.rm(f"{s3_bucket}/runs/r1/run.json")  # as if the driver had died before the end ...
    fs.rm(f"{s3_bucket}/runs/r1/_done/shard-00001.json")  # ... with one shard unfinished
    refused = _clean(env, "resume", run, *sets, "--set", "clip.model=ViT-B-16")
    assert (
        refused.returncode == 2 and "storage.* keys only" in refused.stderr and "clip.model=ViT-B-16" in refused.stderr
    )
    again = _clean(env, "resume", run, "--no-evaluate", *sets)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming: 1 shards done, 1 to run (2 images)" in again.stderr
    scores = pd.read_parquet(f"{run}/scores", storage_options=storage)
    assert len(scores) == 4 and scores["image_id"].is_unique and (scores["status"] == "ok").all()
    with fs.open(f"{s3_bucket}/runs/r1/run.json") as fh:
        record = json.load(fh)
    assert record["status"] == "succeeded" and record["spec"]["storage"]["secret_access_key"] == "***"


def _clean(env, *args):
    """``zsad ARGS`` with the environment ``env`` (the test's without its AWS_* settings)."""
    return zsad(*args, env={**env, **{k: None for k in os.environ if k.startswith("AWS_")}})
