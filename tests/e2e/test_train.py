"""zsad train (APRIL-GAN adapters on Ray Train) end to end with the tiny CLIP on generated data:
a worker killed twice (a restart from the checkpoint, then max_failures used up) and --resume; two
data-parallel workers with input and output on the loopback S3 server, then the trained adapters
in zsad run jobs/aprilgan.yaml with the evaluation; and input that cannot be trained on. Training needs Ray (Ray Train's workers, their kill and
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


def _train_worker(session: int) -> int | None:
    """The pid of the Ray Train worker started by the driver whose session is ``session``."""
    for pid in ray_pids():
        try:
            if os.getsid(pid) == session and b"ray::RayTrainWorker" in open(f"/proc/{pid}/cmdline", "rb").read():
                return pid
        except OSError:
            continue
    return None


def test_killed_workers_restart_from_the_checkpoint_until_max_failures_then_resume_finishes(tmp_path):
    """Needs Ray: Ray Train's workers killed mid-training, and the resume after. 3 epochs,
    train.max_failures 1: the worker killed after epoch 1 is restarted by Ray Train and goes on after
    the last checkpoint (epoch 1 is not trained again); killed again after epoch 2, the restarts are
    used up and the training fails (exit 1) instead of retrying forever; started again without
    --resume it is refused; --resume trains epoch 3 only, the loss curve continuing. (Two
    data-parallel workers: the S3 test.)"""
    make_dataset(str(tmp_path / "in"), categories=("widget",), n_good=2, n_bad=3, size=64)
    out = tmp_path / "out"
    args = ["train", "jobs/train_aprilgan.yaml", "--input", str(tmp_path / "in"), "--output", str(out), "--run-id", "t",
            *TRAIN, "--set", "train.epochs=3", "--set", "train.max_failures=1"]
    before = ray_pids()
    proc = popen(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    marks = [out / "t" / "checkpoints" / f"epoch-{e:04d}" / "state.json" for e in (1, 2)]
    killed, seen, err = [], {}, ""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None and len(killed) < 2:
            mark = marks[len(killed)]
            pid = _train_worker(proc.pid) if mark.exists() else None
            if pid:
                seen[len(killed)] = mark.stat().st_mtime_ns
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_new_ray_processes(before, session=proc.pid)  # whatever the driver's local Ray left, nobody else's
    assert len(killed) == 2, f"killed {len(killed)} workers; the training ended first?\n{err[-3000:]}"
    assert proc.returncode == 1, err[-3000:]
    assert "training failed:" in err and "Traceback" not in err
    assert marks[0].stat().st_mtime_ns == seen[0]  # the restarted worker did not train epoch 1 again
    epoch2 = json.loads(marks[1].read_text())["losses"]
    assert [x["epoch"] for x in epoch2] == [1, 2] and epoch2[0] == json.loads(marks[0].read_text())["losses"][0]
    assert not (out / "t" / "train.json").exists() and not (out / "t" / "adapters.safetensors").exists()

    again = _zsad(*args, here=True)  # refused before Ray starts
    assert again.returncode == 2 and "continue it with --resume" in again.stderr

    res = _zsad(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming: epoch 2 of 3 finished" in res.stderr and "continuing at epoch 3" in res.stderr
    record = json.loads((out / "t" / "train.json").read_text())
    losses = record["losses"]
    assert [x["epoch"] for x in losses] == [1, 2, 3]
    assert losses[:2] == epoch2  # the curve continues from the checkpoint
    assert all(x["images"] == 5 for x in losses) and record["random_weights"] is True
    adapters = out / "t" / "adapters.safetensors"
    import hashlib

    assert record["sha256"] == hashlib.sha256(adapters.read_bytes()).hexdigest()
    assert record["sha256"] in res.stdout and str(adapters) in res.stdout
    assert record["metadata"]["layers"] == [2, 4, 6, 8] and record["metadata"]["backbone"] == "zsad-tiny"
    from pipeline.models.adapters import read_adapter_file

    _, meta = read_adapter_file(str(adapters))  # the file's own metadata: what it was trained on
    assert meta["format"] == "zsad-adapters-1" and (meta["width"], meta["embed"]) == (64, 32)
    assert meta["dataset_digest"] == record["dataset_digest"] and meta["activation"] == "gelu" and meta["epochs"] == 3
    # a run with trained adapters and its evaluation: the next test (the same code, with the file on S3)


def test_training_with_input_and_output_on_s3_then_a_run_with_the_s3_adapters(tmp_path, s3_bucket, s3_env):
    """Needs Ray: two data-parallel Ray Train workers (DDP) read their data and write their
    checkpoints on S3; asked for a GPU with use_gpu auto, they train on the CPU of this machine's Ray."""
    from pipeline.io import fs as fsio

    storage = fsio.storage_options()
    make_dataset(f"s3://{s3_bucket}/data", categories=("gear",), n_good=2, n_bad=2, size=64, storage=storage)
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    res = _zsad("train", "jobs/train_aprilgan.yaml", "--input", f"s3://{s3_bucket}/data", "--output", f"s3://{s3_bucket}/train",
                "--run-id", "s", *TRAIN, "--set", "train.epochs=1", "--set", "train.num_workers=2", "--set", "train.use_gpu=auto",
                "--set", "train.resources_per_worker={CPU: 0.5, GPU: 1}", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    # the preset's GPU request on a local Ray without a GPU (train.use_gpu auto): trained on the CPU, and said so
    assert "train.use_gpu is auto and this machine's Ray has no GPU: training on the CPU (2 worker(s) x {CPU: 0.5})" \
        in res.stderr
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

