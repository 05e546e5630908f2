"""The run folder's lease (issue 11, defect 6): one holder at a time, atomically, on local disk and
on S3 (moto's server); a stale lease is taken over only by a resume."""

import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline.io.lease import LEASE, Lease, LeaseHeld


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _check(run_dir, storage=None, read=None):
    first = Lease(run_dir, storage)
    assert first.acquire("r1") is None
    second = Lease(run_dir, storage)
    with pytest.raises(LeaseHeld, match=r"run r1 is in progress \(since .*, on .* pid \d+\)"):
        second.acquire("r1")
    with pytest.raises(LeaseHeld, match="in progress"):  # a live holder is never taken over
        second.acquire("r1", takeover=True)
    first.heartbeat()
    first.release()
    assert second.acquire("r1") is None  # free again
    second.release()


def test_one_holder_at_a_time_on_local_disk(tmp_path):
    _check(str(tmp_path / "run"))
    assert not (tmp_path / "run" / LEASE).exists()


def test_one_holder_at_a_time_on_s3(s3_bucket, s3_env):
    from pipeline.io.fs import storage_options

    _check(f"s3://{s3_bucket}/runs/r1", storage_options())


def test_a_stale_lease_is_taken_over_only_by_a_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    gone = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "2026-12-01T00:00:00+00:00",
            "heartbeat": "2026-12-01T00:00:00+00:00", "token": "x"}
    (run / LEASE).write_text(json.dumps(gone))
    with pytest.raises(LeaseHeld, match="was interrupted .* continue it with --resume"):
        Lease(str(run)).acquire("r1")
    lease = Lease(str(run))
    assert lease.acquire("r1", takeover=True)["pid"] == gone["pid"]
    assert json.loads((run / LEASE).read_text())["pid"] == os.getpid()
    other_host = {**gone, "host": "elsewhere", "pid": 1, "heartbeat": "2999-01-01T00:00:00+00:00"}
    lease.release()
    (run / LEASE).write_text(json.dumps(other_host))  # another host, fresh heartbeat: not stale
    with pytest.raises(LeaseHeld, match="in progress"):
        Lease(str(run)).acquire("r1", takeover=True)
    (run / LEASE).write_text(json.dumps({**other_host, "heartbeat": "2000-01-01T00:00:00+00:00"}))
    assert Lease(str(run)).acquire("r1", takeover=True, timeout_s=60)["host"] == "elsewhere"
