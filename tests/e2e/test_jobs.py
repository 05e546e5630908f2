"""Ray Jobs end to end: a real two-node Ray cluster on this machine (``ray start --head`` plus a second
node joining it, token authentication on), jobs submitted, followed, stopped and retried with the
zsad CLI."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers.badfiles import write_good_images
from tests.helpers.procs import ray_pids, stop_new_ray_processes

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ZSAD = str(BIN / "zsad")
RAY = str(BIN / "ray")
REPO = Path(__file__).resolve().parents[2]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _alive_nodes(env, gcs: int) -> int:
    res = subprocess.run(
        [RAY, "status", f"--address=127.0.0.1:{gcs}"], env=env, capture_output=True, text=True, timeout=60
    )
    active = res.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


@pytest.fixture(scope="module")
def cluster():
    before = ray_pids()
    root = Path(tempfile.mkdtemp(prefix="zr", dir="/tmp"))  # short: Ray's socket paths live under it
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    gcs, dash, client, *agent = _free_ports(11)  # explicit ports: two nodes on one machine must not share any
    head = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={root / 'r'}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent[4]}",
        f"--metrics-export-port={agent[5]}",
        f"--dashboard-agent-grpc-port={agent[6]}",
        f"--runtime-env-agent-port={agent[7]}",
        "--disable-usage-stats",
    ]
    worker = [
        RAY,
        "start",
        f"--address=127.0.0.1:{gcs}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        f"--dashboard-agent-listen-port={agent[0]}",
        f"--metrics-export-port={agent[1]}",
        f"--dashboard-agent-grpc-port={agent[2]}",
        f"--runtime-env-agent-port={agent[3]}",
        "--disable-usage-stats",
    ]
    try:
        for cmd in (head, worker):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        deadline = time.monotonic() + 90
        while _alive_nodes(env, gcs) < 2:
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        keep = os.environ.get("ZSAD_KEEP_RAY_LOGS")  # debugging: copy the cluster's logs there
        if keep:
            shutil.copytree(root / "r" / "session_latest" / "logs", keep, dirs_exist_ok=True)
        stop_new_ray_processes(before, marker=str(root))  # only this cluster's processes
        shutil.rmtree(root, ignore_errors=True)


def _zsad(cluster, *args, timeout=300, address_env=True):
    """A subprocess, not the test's process: Ray's client caches the token of the first cluster it
    met in a process, and this cluster has its own."""
    env = dict(cluster["env"])
    if address_env:
        env["RAY_API_SERVER_ADDRESS"] = cluster["address"]
    return subprocess.run([ZSAD, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _status(cluster, run_id):
    res = _zsad(cluster, "status", run_id, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_submit_follow_status_and_outputs(cluster, tmp_path):
    """Needs Ray: Ray Jobs on a 2-node cluster (submission, logs, status)."""
    write_good_images(tmp_path / "in" / "parts", 30, size=(40, 40))
    out = tmp_path / "out"
    sub = _zsad(
        cluster,
        "submit",
        "jobs/smoke.yaml",
        "--address",
        cluster["address"],
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--run-id",
        "job-ok",
        "--set",
        "shard_size=10",
        address_env=False,
    )
    assert sub.returncode == 0, sub.stderr[-3000:]
    assert "submitted run job-ok (submission job-ok)" in sub.stdout

    follow = _zsad(cluster, "logs", "job-ok", "--follow")
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    assert "run job-ok: succeeded" in follow.stdout and "attempt 1: SUCCEEDED" in follow.stderr

    status = _status(cluster, "job-ok")
    assert status["status"] == "SUCCEEDED" and len(status["attempts"]) == 1
    assert status["attempts"][0]["exit_code"] == 0 and status["attempts"][0]["output"] == str(out)
    assert status["run"]["status"] == "succeeded" and status["run"]["counts"] == {
        "images": 30,
        "ok": 30,
        "failed": 0,
        "missing": 0,
    }
    text = _zsad(cluster, "status", "job-ok")
    assert "run job-ok: SUCCEEDED (attempt 1 of 1)" in text.stdout and "random model weights" in text.stdout

    scores = pd.read_parquet(out / "job-ok" / "scores")
    assert len(scores) == 30 and scores["image_id"].is_unique and (scores["status"] == "ok").all()
    manifest = json.loads((out / "job-ok" / "run.json").read_text())
    assert manifest["ray"]["resources"]["CPU"] == 3.0  # the run saw both nodes of the cluster
    assert manifest["spec"]["shard_size"] == 10  # the --set override travelled with the spec

    again = _zsad(
        cluster,
        "submit",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--run-id",
        "job-ok",
    )
    assert again.returncode == 2 and "already has a job 'job-ok'" in again.stderr
    # a resubmission (a retry loop's) of the succeeded run: the attempt ends as succeeded, nothing is rewritten
    record = (out / "job-ok" / "run.json").stat().st_mtime_ns
    resumed = _zsad(
        cluster,
        "submit",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--run-id",
        "job-ok",
        "--set",
        "shard_size=10",
        "--resume",
        "--wait",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "run job-ok already succeeded (finished at" in resumed.stdout and "nothing to do" in resumed.stdout
    assert [a["status"] for a in _status(cluster, "job-ok")["attempts"]] == ["SUCCEEDED", "SUCCEEDED"]
    assert (out / "job-ok" / "run.json").stat().st_mtime_ns == record
    assert _zsad(cluster, "status", "no-such-run").returncode == 2
    bad = _zsad(cluster, "submit", "jobs/smoke.yaml", "--input", "x", "--output", "y", "--set", "shard_sise=3")
    assert bad.returncode == 2 and "shard_sise" in bad.stderr


def test_stop_a_long_job(cluster, tmp_path):
    """Needs Ray: stopping a Ray job whose task hangs on the cluster."""
    good = write_good_images(tmp_path / "imgs", 3, size=(40, 40))
    fifo = tmp_path / "imgs" / "stuck.png"
    os.mkfifo(fifo)  # reading it blocks forever: the job never ends by itself
    manifest = tmp_path / "inputs.csv"
    manifest.write_text("uri,category\n" + "".join(f"{p},parts\n" for p in [*good, fifo]))
    out = tmp_path / "out"
    sub = _zsad(
        cluster,
        "submit",
        "jobs/smoke.yaml",
        "--input",
        str(manifest),
        "--output",
        str(out),
        "--run-id",
        "job-long",
        "--set",
        "resources.decode.batch_size=1",
    )
    assert sub.returncode == 0, sub.stderr[-3000:]
    deadline = time.monotonic() + 120
    while not (out / "job-long" / "_plan.json").exists():  # the driver is running on the cluster
        assert time.monotonic() < deadline, _zsad(cluster, "logs", "job-long").stdout[-3000:]
        time.sleep(0.5)
    assert _status(cluster, "job-long")["status"] == "RUNNING"
    stopped = _zsad(cluster, "stop", "job-long")
    assert stopped.returncode == 0, stopped.stderr
    assert "attempt 1: STOPPED" in stopped.stdout
    assert _status(cluster, "job-long")["status"] == "STOPPED"
    assert not (out / "job-long" / "run.json").exists()  # interrupted, resumable
    follow = _zsad(cluster, "logs", "job-long", "--follow", timeout=60)
    assert follow.returncode == 1
    again = _zsad(cluster, "stop", "job-long")
    assert again.returncode == 0 and "already STOPPED" in again.stdout


def _driver_pid(run_id: str) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"job.yaml" in cmd
            and run_id.encode() in cmd
            and b"run" in cmd
            and b"submit" not in cmd
            and any(c.endswith(b"zsad") for c in cmd)
        ):
            return int(pid)
    return None


def test_retries_resubmit_a_killed_job_with_resume_exactly_once(cluster, tmp_path):
    """Needs Ray: a killed Ray job resubmitted with --resume by zsad submit --retries."""
    write_good_images(tmp_path / "in" / "parts", 120, size=(40, 40))
    out = tmp_path / "out"
    env = dict(cluster["env"], RAY_API_SERVER_ADDRESS=cluster["address"])
    proc = subprocess.Popen(
        [
            ZSAD,
            "submit",
            "jobs/smoke.yaml",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(out),
            "--run-id",
            "job-retry",
            "--retries",
            "1",
            "--set",
            "shard_size=20",
            "--set",
            "resources.decode.batch_size=4",
            "--set",
            "resources.clip_score.batch_size=4",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    done = out / "job-retry" / "_done"
    killed = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        n = len(list(done.glob("shard-*.json"))) if done.exists() else 0
        pid = _driver_pid("job-retry") if 1 <= n < 6 else None
        if pid:
            os.kill(pid, signal.SIGKILL)  # the driver dies at 3 a.m.
            killed = n
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed is not None, "the job finished (or hung) before its driver could be killed midway"
    assert proc.returncode == 0, stderr[-4000:]
    assert "retry 1/1: resubmitted as job-retry--attempt-2 with --resume" in stderr
    status = _status(cluster, "job-retry")
    assert [a["status"] for a in status["attempts"]] == ["FAILED", "SUCCEEDED"]
    assert [a["submission_id"] for a in status["attempts"]] == ["job-retry", "job-retry--attempt-2"]
    assert "resuming:" in _zsad(cluster, "logs", "job-retry", "--attempt", "2").stdout
    inputs = set(pd.read_parquet(out / "job-retry" / "inputs.parquet")["image_id"])
    assert len(inputs) == 120
    for table in ("scores", "masks"):
        df = pd.read_parquet(out / "job-retry" / table)
        assert df["image_id"].is_unique and set(df["image_id"]) == inputs, table
    manifest = json.loads((out / "job-retry" / "run.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["shards"] == {"size": 20, "count": 6, "done": 6}


def test_training_waits_for_workers_the_cluster_cannot_place_and_gives_up(cluster, tmp_path):
    """Needs Ray: a cluster (no GPU, no autoscaler) cannot place a GPU worker; zsad train attached to
    it says what it waits for and what the cluster has, and gives up after train.start_timeout_s
    with exit 1 instead of waiting forever."""
    from pipeline.synthetic import make_dataset

    make_dataset(str(tmp_path / "in"), categories=("widget",), n_good=2, n_bad=2, size=48)
    t0 = time.monotonic()
    res = _zsad(
        cluster,
        "train",
        "jobs/train_aprilgan.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "t"),
        "--run-id",
        "wait",
        "--address",
        cluster["gcs"],
        "--tiny",
        "--set",
        "train.use_gpu=true",
        "--set",
        "train.resources_per_worker={CPU: 1, GPU: 1}",
        "--set",
        "train.start_timeout_s=6",
        address_env=False,
        timeout=240,
    )
    assert res.returncode == 1, res.stderr[-3000:]
    assert time.monotonic() - t0 < 6 + 90  # the limit, the attach and Ray Train's start, not a wait without end
    assert "waiting for 1 training worker(s) with {CPU: 1, GPU: 1} each: the cluster has {CPU: 3" in res.stderr
    assert "train.start_timeout_s gives up after 6 s" in res.stderr  # the first line comes at half the limit here
    assert (
        "no training worker started in 6 s (train.start_timeout_s): Ray could not place 1 training worker(s)"
        in res.stderr
    )
    assert "Traceback" not in res.stderr
