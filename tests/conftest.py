"""Shared pytest fixtures: an S3 server on loopback (moto's standalone server).

- ``s3_server`` (session): starts ``moto_server -H 127.0.0.1 -p PORT`` (or ``python -m moto.server``)
  as a subprocess, waits until it answers HTTP and yields its connection settings; the process it
  started is terminated at the end of the session.
- ``s3_env`` (function): points the standard AWS_* environment variables at that server and clears
  s3fs's cached filesystem instances, so ``storage_options()`` and ``filesystem()`` reach it.
- ``s3_bucket`` (function): a fresh, uniquely named, empty bucket on that server.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from tests.helpers.moto import answers, free_port, moto_command

# make test runs one pytest-xdist worker per core: with torch's default of one OpenMP thread per
# core in every worker (and in the zsad commands and Ray workers they start), the threads spin
# against each other and the suite takes 40 % longer; one thread per process instead (set before
# any test module imports torch; subprocesses inherit it)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    proc = subprocess.Popen(
        moto_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        deadline = time.monotonic() + 20.0
        while not answers(endpoint + "/moto-api/"):
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with code {proc.returncode} before answering on {endpoint}")
            if time.monotonic() > deadline:
                pytest.fail(f"moto server did not answer on {endpoint} within 20 s")
            time.sleep(0.05)
        yield {"endpoint_url": endpoint, **_CREDENTIALS}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server["region"])
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_env):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_env["endpoint_url"],
        aws_access_key_id=s3_env["access_key_id"],
        aws_secret_access_key=s3_env["secret_access_key"],
        region_name=s3_env["region"],
    )
    name = f"zsad-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name


#: the modules that take longest (each a few Ray starts): collected first, so that pytest-xdist
#: (make test: --dist loadscope, a module per worker at a time) starts them first and the short ones
#: fill in around them, instead of one long module running alone at the end
SLOW_FIRST = ("tests/e2e/test_train.py", "tests/e2e/test_jobs.py", "tests/e2e/test_resume.py",
              "tests/e2e/test_golden_outputs.py", "tests/e2e/test_new_user.py", "tests/e2e/test_gpu_execution.py",
              "tests/e2e/test_gpu_suite.py", "tests/e2e/test_plan_resources.py", "tests/e2e/test_cli_run.py",
              "tests/e2e/test_refusals.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))  # stable: the rest in order
