"""zsad train (APRIL-GAN adapters on Ray Train) end to end with the tiny CLIP on generated data:
one training on the loopback S3 server with two data-parallel workers, killed twice (a restart from
the checkpoint, then max_failures used up) and resumed, whose adapters then score a run of
jobs/aprilgan.yaml with the evaluation; and input that cannot be trained on. Training needs Ray
(Ray Train's workers, their kill and resume); the runs that use the trained adapters are
in-process (tests/helpers/zsad.py)."""

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest

from pipeline.synthetic import make_dataset
from tests.helpers.procs import ray_pids, stop_new_ray_processes
from tests.helpers.zsad import TINY, popen
from tests.helpers.zsad import zsad as _zsad

pytestmark = pytest.mark.integration
# two Ray Train workers and the decode tasks share the 2 CPUs of a local Ray
TRAIN = [*TINY, "--set", "train.batch_size=4", "--set", "train.resources_per_worker={CPU: 0.5}",
         "--set", "resources.decode.num_cpus=0.25", "--set", "resources.decode.batch_size=4"]
RUN = [*TINY, "--executor", "local"]  # the scoring run checks the adapters, not Ray: no second Ray start


def _train_worker(session: int) -> int | None:
    """The pid of the Ray Train worker started by the driver whose session is ``session``."""
    for pid in ray_pids():
        try:
            if os.getsid(pid) == session and b"ray::RayTrainWorker" in open(f"/proc/{pid}/cmdline", "rb").read():
                return pid
        except OSError:
            continue
    return None


def test_training_on_s3_killed_workers_resume_and_a_run_with_the_adapters(tmp_path, s3_bucket, s3_env):
    """Needs Ray: Ray Train's workers, killed mid-training, and the resume after; one training (each
    costs a Ray start and a Train start) that goes through all of it:

    - two data-parallel workers (DDP) read their data and write their checkpoints on S3; asked for
      a GPU with use_gpu auto, they train on the CPU of this machine's Ray, and say so;
    - train.max_failures 1, 3 epochs: a worker killed after epoch 1 is restarted by Ray Train and the
      workers go on after the last checkpoint (epoch 1 is not trained again); killed again after
      epoch 2, the restarts are used up and the training fails (exit 1) instead of retrying forever;
    - started again without --resume it is refused; --resume trains epoch 3 only (the driver reads
      the checkpoints back from S3), the loss curve continuing;
    - the adapters on S3 then score a run of jobs/aprilgan.yaml, evaluated (in-process)."""
    import hashlib

    from pipeline.io import fs as fsio
    from pipeline.models.adapters import read_adapter_file

    storage = fsio.storage_options()
    make_dataset(f"s3://{s3_bucket}/data", categories=("gear",), n_good=2, n_bad=2, size=64, storage=storage)
    env = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    args = [
        "train",
        "jobs/train_aprilgan.yaml",
        "--input",
        f"s3://{s3_bucket}/data",
        "--output",
        f"s3://{s3_bucket}/train",
        "--run-id",
        "s",
        *TRAIN,
        "--set",
        "train.epochs=3",
        "--set",
        "train.num_workers=2",
        "--set",
        "train.max_failures=1",
        "--set",
        "train.use_gpu=auto",
        "--set",
        "train.resources_per_worker={CPU: 0.5, GPU: 1}",
    ]
    fs, root = fsio.filesystem(f"s3://{s3_bucket}/train/s", storage)
    marks = [f"{root}/checkpoints/epoch-{e:04d}/state.json" for e in (1, 2)]

    def stamp(path: str):
        fs.invalidate_cache()
        return fs.info(path)["ETag"], fs.info(path)["LastModified"]

    before = ray_pids()
    proc = popen(*args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed, seen, err = [], {}, ""
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None and len(killed) < 2:
            fs.invalidate_cache()
            pid = _train_worker(proc.pid) if fs.exists(marks[len(killed)]) else None
            if pid:
                seen[len(killed)] = stamp(marks[len(killed)])
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
    assert (
        "train.use_gpu is auto and this machine's Ray has no GPU: training on the CPU (2 worker(s) x {CPU: 0.5})" in err
    )
    assert stamp(marks[0]) == seen[0]  # the restarted workers did not train epoch 1 again
    epoch2 = json.loads(fs.cat(marks[1]))["losses"]
    assert [x["epoch"] for x in epoch2] == [1, 2] and epoch2[0] == json.loads(fs.cat(marks[0]))["losses"][0]
    assert not fs.exists(f"{root}/train.json") and not fs.exists(f"{root}/adapters.safetensors")

    again = _zsad(*args, env=env, here=True)  # refused before Ray starts
    assert again.returncode == 2 and "continue it with --resume" in again.stderr

    res = _zsad(*args, "--resume", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming: epoch 2 of 3 finished" in res.stderr and "continuing at epoch 3" in res.stderr
    fs.invalidate_cache()
    record = json.loads(fs.cat(f"{root}/train.json"))
    losses = record["losses"]
    assert [x["epoch"] for x in losses] == [1, 2, 3] and losses[:2] == epoch2  # the curve continues
    assert all(x["images"] == 4 for x in losses) and record["random_weights"] is True
    adapters = f"s3://{s3_bucket}/train/s/adapters.safetensors"
    local = tmp_path / "adapters.safetensors"
    local.write_bytes(fsio.read_bytes(adapters, storage))
    assert record["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    assert record["sha256"] in res.stdout and adapters in res.stdout
    assert record["metadata"]["layers"] == [2, 4, 6, 8] and record["metadata"]["backbone"] == "zsad-tiny"
    _, meta = read_adapter_file(str(local))  # the file's own metadata: what it was trained on
    assert meta["format"] == "zsad-adapters-1" and (meta["width"], meta["embed"]) == (64, 32)
    assert meta["dataset_digest"] == record["dataset_digest"] and meta["activation"] == "gelu" and meta["epochs"] == 3
    fs.invalidate_cache()
    files = {p: fs.info(p)["ETag"] for p in fs.find(root)}
    done = _zsad(*args, "--resume", env=env, here=True)  # a retry loop's resume of the finished training: nothing to do
    assert done.returncode == 0 and "train s already finished (at " in done.stdout and record["sha256"] in done.stdout
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(root)} == files  # nothing written, not even a log

    run = _zsad(
        "run",
        "jobs/aprilgan.yaml",
        "--input",
        f"s3://{s3_bucket}/data",
        "--output",
        f"s3://{s3_bucket}/runs",
        "--run-id",
        "r",
        *RUN,
        "--set",
        f"pixel.weights={adapters}",
        env=env,
    )
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
    res = _zsad(
        "train",
        "jobs/train_aprilgan.yaml",
        "--input",
        str(tmp_path / "plain"),
        "--output",
        str(tmp_path / "o"),
        *TRAIN,
        here=True,
    )
    assert res.returncode == 2 and "no image has a ground-truth label" in res.stderr, res.stderr[-2000:]
    # an mvtec tree whose masks are gone
    make_dataset(str(tmp_path / "nomask"), categories=("widget",), n_good=1, n_bad=2, size=48)
    for m in (tmp_path / "nomask").rglob("*_mask.png"):
        m.unlink()
    res = _zsad(
        "train",
        "jobs/train_aprilgan.yaml",
        "--input",
        str(tmp_path / "nomask"),
        "--output",
        str(tmp_path / "o"),
        *TRAIN,
        here=True,
    )
    assert res.returncode == 2 and "have no masks" in res.stderr, res.stderr[-2000:]
    # a category with no images
    res = _zsad(
        "train",
        "jobs/train_aprilgan.yaml",
        "--input",
        str(tmp_path / "nomask"),
        "--output",
        str(tmp_path / "o"),
        "--set",
        "data.categories=[screw]",
        *TRAIN,
        here=True,
    )
    assert res.returncode == 2 and "screw" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("train.json"))
    # a corrupt adapters file for a run: refused before anything starts
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(300))
    run = _zsad(
        "run",
        "jobs/aprilgan.yaml",
        "--input",
        str(tmp_path / "nomask"),
        "--output",
        str(tmp_path / "runs"),
        *RUN,
        "--set",
        f"pixel.weights={bad}",
    )
    assert run.returncode == 2 and str(bad) in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
