"""zsad train (APRIL-GAN adapters on Ray Train) end to end with the tiny CLIP on generated data:
two workers, a kill after the first epoch and --resume; one worker with input and output on the
loopback S3 server, then the trained adapters in zsad run jobs/aprilgan.yaml with the evaluation;
and input that cannot be trained on. Training needs Ray (Ray Train's workers, their kill and
resume); the runs that use the trained adapters are in-process (tests/helpers/zsad.py)."""

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest

from pipeline.synthetic import make_dataset
from tests.helpers.procs import ray_pids, stop_new_ray_processes
from tests.helpers.zsad import TINY, popen, zsad as _zsad

pytestmark = pytest.mark.integration
# two Ray Train workers and the decode tasks share the 2 CPUs of a local Ray
TRAIN = [*TINY, "--set", "train.batch_size=4", "--set", "train.resources_per_worker={CPU: 0.5}",
         "--set", "resources.decode.num_cpus=0.25", "--set", "resources.decode.batch_size=4"]
RUN = [*TINY]


def test_two_workers_killed_after_an_epoch_resume_and_the_adapters_score_a_run(tmp_path):
    """Needs Ray: two Ray Train workers, killed with their driver after an epoch, resumed from the checkpoint."""
    make_dataset(str(tmp_path / "in"), categories=("widget",), n_good=3, n_bad=5, size=96)
    out = tmp_path / "out"
    args = ["train", "jobs/train_aprilgan.yaml", "--input", str(tmp_path / "in"), "--output", str(out), "--run-id", "t",
            *TRAIN, "--set", "train.num_workers=2", "--set", "train.epochs=2"]
    before = ray_pids()
    proc = popen(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = out / "t" / "checkpoints" / "epoch-0001" / "state.json"
    deadline = time.monotonic() + 420
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if first.exists():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.1)
    proc.wait(timeout=60)
    stop_new_ray_processes(before, session=proc.pid)  # the killed driver's local Ray, nobody else's
    assert killed, "the training finished (or failed) before its first checkpoint could be seen"
    assert not (out / "t" / "train.json").exists() and not (out / "t" / "adapters.safetensors").exists()
    epoch1 = json.loads(first.read_text())["losses"]

    again = _zsad(*args, here=True)  # refused before Ray starts
    assert again.returncode == 2 and "continue it with --resume" in again.stderr

    res = _zsad(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming: epoch" in res.stderr and "continuing at epoch" in res.stderr
    record = json.loads((out / "t" / "train.json").read_text())
    losses = record["losses"]
    assert [x["epoch"] for x in losses] == [1, 2]
    done_before = max(x["epoch"] for x in epoch1)
    assert losses[:done_before] == epoch1  # the curve continues from the checkpoint
    assert all(x["images"] == 8 for x in losses) and record["random_weights"] is True
    adapters = out / "t" / "adapters.safetensors"
    import hashlib

    assert record["sha256"] == hashlib.sha256(adapters.read_bytes()).hexdigest()
    assert record["sha256"] in res.stdout and str(adapters) in res.stdout
    assert record["metadata"]["layers"] == [2, 4, 6, 8] and record["metadata"]["backbone"] == "zsad-tiny"
    from pipeline.models.adapters import read_adapter_file

    _, meta = read_adapter_file(str(adapters))  # the file's own metadata: what it was trained on
    assert meta["format"] == "zsad-adapters-1" and (meta["width"], meta["embed"]) == (64, 32)
    assert meta["dataset_digest"] == record["dataset_digest"] and meta["activation"] == "gelu" and meta["epochs"] == 2
    # a run with trained adapters and its evaluation: the next test (the same code, with the file on S3)


def test_training_with_input_and_output_on_s3_then_a_run_with_the_s3_adapters(tmp_path, s3_bucket, s3_env):
    """Needs Ray: Ray Train's worker reads its data and writes its checkpoints on S3."""
    from pipeline.io import fs as fsio

    storage = fsio.storage_options()
    make_dataset(f"s3://{s3_bucket}/data", categories=("gear",), n_good=2, n_bad=2, size=64, storage=storage)
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    res = _zsad("train", "jobs/train_aprilgan.yaml", "--input", f"s3://{s3_bucket}/data", "--output", f"s3://{s3_bucket}/train",
                "--run-id", "s", *TRAIN, "--set", "train.epochs=1", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    adapters = f"s3://{s3_bucket}/train/s/adapters.safetensors"
    assert fsio.exists(adapters, storage) and fsio.exists(f"s3://{s3_bucket}/train/s/train.json", storage)
    assert fsio.exists(f"s3://{s3_bucket}/train/s/checkpoints/epoch-0001/state.json", storage)
    run = _zsad("run", "jobs/aprilgan.yaml", "--input", f"s3://{s3_bucket}/data", "--output", f"s3://{s3_bucket}/runs",
                "--run-id", "r", *RUN, "--set", f"pixel.weights={adapters}", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    scores = pd.read_parquet(f"s3://{s3_bucket}/runs/r/scores", storage_options=storage)
    assert (scores["status"] == "ok").all() and (scores["pixel_weights"] == f"uri:{adapters}").all()
    assert (scores["pixel_method"] == "april_gan").all()
    metrics = pd.read_parquet(f"s3://{s3_bucket}/runs/r/metrics", storage_options=storage)
    assert metrics["pixel_auroc"].notna().all()
    masks = pd.read_parquet(f"s3://{s3_bucket}/runs/r/masks", storage_options=storage)
    assert (masks["map_max"] == 4.0).all()  # four layers' probabilities summed


def test_input_that_cannot_be_trained_on_is_refused_with_exit_2(tmp_path):
    """Every command here is refused before Ray starts: they run in the test's process."""
    from PIL import Image

    # a folder of unlabelled images
    (tmp_path / "plain" / "parts").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "plain" / "parts" / "a.png")
    res = _zsad("train", "jobs/train_aprilgan.yaml", "--input", str(tmp_path / "plain"), "--output", str(tmp_path / "o"), *TRAIN,
                here=True)
    assert res.returncode == 2 and "no image has a ground-truth label" in res.stderr, res.stderr[-2000:]
    # an mvtec tree whose masks are gone
    make_dataset(str(tmp_path / "nomask"), categories=("widget",), n_good=1, n_bad=2, size=48)
    for m in (tmp_path / "nomask").rglob("*_mask.png"):
        m.unlink()
    res = _zsad("train", "jobs/train_aprilgan.yaml", "--input", str(tmp_path / "nomask"), "--output", str(tmp_path / "o"), *TRAIN,
                here=True)
    assert res.returncode == 2 and "have no masks" in res.stderr, res.stderr[-2000:]
    # a category with no images
    res = _zsad("train", "jobs/train_aprilgan.yaml", "--input", str(tmp_path / "nomask"), "--output", str(tmp_path / "o"),
                "--set", "data.categories=[screw]", *TRAIN, here=True)
    assert res.returncode == 2 and "screw" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("train.json"))
    # a corrupt adapters file for a run: refused before anything starts
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(300))
    run = _zsad("run", "jobs/aprilgan.yaml", "--input", str(tmp_path / "nomask"), "--output", str(tmp_path / "runs"),
                *RUN, "--set", f"pixel.weights={bad}")
    assert run.returncode == 2 and str(bad) in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
