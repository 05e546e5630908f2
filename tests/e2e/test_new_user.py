"""What a new user hit (issue 11), end to end with the CLI: in-process runs, and a local Ray where
Ray's behaviour is what is checked (each such test says why)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.synthetic import make_dataset
from tests.helpers.zsad import popen
from tests.helpers.zsad import zsad as _zsad

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("content", ["garbage", "pickle"])
def test_an_unusable_weights_file_stops_the_run_with_exit_2_and_its_reason(tmp_path, content):
    """Defect 4: a garbage .pt (or a pickle that weights_only refuses) gave the reason
    `SystemException: SystemException()` after ~340 lines of actor tracebacks. Both files are now
    refused by the driver's check before any stage starts (in-process executor)."""
    import fractions

    import torch

    bad = tmp_path / "bad.pt"
    if content == "garbage":
        bad.write_bytes(os.urandom(2000))
    else:  # a real torch checkpoint holding an object weights_only=True refuses to unpickle
        torch.save({"visual.proj": fractions.Fraction(1, 3)}, bad)
    make_dataset(str(tmp_path / "in"), categories=("widget",), n_good=1, n_bad=1, size=48)
    res = _zsad("run", "jobs/smoke.yaml", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                "--run-id", "w", "--no-evaluate", "--set", f"clip.weights={bad}", timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "SystemException" not in res.stderr + res.stdout
    assert str(bad) in res.stderr and "could not be loaded safely" in res.stderr
    assert res.stderr.count("Traceback") == 0, res.stderr[-3000:]
    val = _zsad("validate", "jobs/smoke.yaml", "--set", f"clip.weights={tmp_path / 'missing.pt'}", timeout=120)
    assert val.returncode == 2 and "missing.pt" in val.stderr and "does not exist" in val.stderr


def test_odd_names_links_and_skips_in_one_labelled_run_evaluated_in_its_own_ray(tmp_path):
    """One run on an mvtec tree holding what a new user's folders hold (one run: each costs a Ray start):

    - defect 1: `bad\xff\xfename.png` killed the run with UnicodeEncodeError before anything was written;
    - defects 2 and 3: links were dropped without a trace, and so were files of other endings;
    - defect 10: a labelled run evaluated itself in a second local Ray (about 45 s more).

    Needs Ray: the evaluation must reuse the run's Ray session, and Ray's own output must go to the
    run's log, not the terminal."""
    import pandas as pd

    from pipeline.io import fs as fsio

    make_dataset(str(tmp_path / "in"), categories=("widget",), n_good=3, n_bad=2, size=48)
    good = tmp_path / "in" / "widget" / "test" / "good"
    first, second = sorted(good.iterdir())[:2]
    odd = os.path.join(os.fsencode(good), b"bad\xff\xfename.png")
    os.rename(second, odd)
    os.symlink(first, good / "link.png")
    os.symlink(tmp_path / "gone.png", good / "dangling.png")
    (good / "anim.gif").write_bytes(b"GIF89a")
    res = _zsad("run", "jobs/smoke.yaml", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                "--run-id", "odd", "--set", "max_error_rate=0.5", ray=True)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "out" / "odd"
    scores = pd.read_parquet(run / "scores")
    assert len(scores) == 7 and (scores["status"] == "ok").sum() == 6  # 5 images + the link + the dangling link
    # defect 1: scored, and the stored URI reads back the same file
    stored = [u for u in scores["uri"] if "name.png" in u]
    assert len(stored) == 1 and stored[0].startswith("file://") and "%FF%FE" in stored[0].upper()
    with open(odd, "rb") as fh:
        assert fsio.read_bytes(stored[0]) == fh.read()
    assert sorted(pd.read_parquet(run / "inputs.parquet")["uri"]) == sorted(scores["uri"])
    # defects 2 and 3: the link is scored, the dangling one is an error row, the .gif is counted
    assert scores.loc[scores["uri"].str.endswith("link.png"), "status"].tolist() == ["ok"]
    errors = pd.read_parquet(run / "errors")
    assert errors[["stage", "error_type"]].values.tolist() == [["list", "BrokenLink"]]
    assert "gone.png" in errors["message"].iloc[0]
    record = json.loads((run / "run.json").read_text())
    assert record["skipped_at_listing"]["extension"] == 1 and record["failed_by_stage"] == {"list": 1}
    assert "left out at listing:" in res.stdout and "extension 1" in res.stdout and "data.extensions" in res.stdout
    # defect 10: evaluated in the run's own Ray session, after the summary
    assert res.stderr.count("starting a local Ray instance") == 1, res.stderr[-3000:]
    assert (run / "metrics.md").exists() and res.stdout.index("run odd: succeeded") < res.stdout.index("metrics:")
    # Ray's own output (its warnings, core worker lines, Ray Data's INFO lines, the workers' lines)
    # is not on the terminal without --verbose, and is in the run's log, named by run.json
    noise = ("Token authentication", "core_worker", "Progress bars disabled", "execution finished", "pid=")
    assert not [n for n in noise if n in res.stderr], res.stderr
    assert record["log"].startswith(str(run / "logs" / "run-")) and record["log"] in res.stdout
    log = Path(record["log"]).read_text()
    assert "execution finished" in log and "clip_score actor ready" in log and "[zsad] run odd: 7 images" in log
    assert "\x1b[" not in log  # the workers' prefix without colour codes


def test_object_storage_going_away_mid_run_ends_with_one_reason_and_a_resume_hint(tmp_path):
    """Defect 5: with the S3 endpoint stopped after some shards, the run crashed in five tracebacks
    with no summary and no run.json. Now: one reason, exit 1, the resume hint, finished shards kept."""
    import time

    import boto3

    from tests.helpers.badfiles import write_good_images
    from tests.helpers.moto import answers, free_port, moto_command

    write_good_images(tmp_path / "in" / "parts", 160, size=(32, 32))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen(
        moto_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **creds}
    )
    try:
        deadline = time.monotonic() + 20
        while not answers(endpoint + "/moto-api/") and time.monotonic() < deadline:
            time.sleep(0.05)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="out")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
        # one attempt per request (botocore's default retries take about 60 s at a dead endpoint)
        env.update(creds, AWS_ENDPOINT_URL=endpoint, AWS_MAX_ATTEMPTS="1")
        proc = popen(
            "run",
            "jobs/smoke.yaml",
            "--input",
            str(tmp_path / "in"),
            "--output",
            "s3://out/runs",
            "--run-id",
            "gone",
            "--no-evaluate",
            "--set",
            "shard_size=16",
            "--set",
            "retries.read=0",
            "--set",
            "resources.decode.batch_size=8",
            "--set",
            "resources.clip_score.batch_size=8",
            env=env,
            inherit=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 300
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            done = s3.list_objects_v2(Bucket="out", Prefix="runs/gone/_done/").get("KeyCount", 0)
            if done >= 3:
                break
            time.sleep(0.1)
        assert done >= 3, "the run finished (or hung) before the storage could be stopped midway"
        server.terminate()
        server.wait(timeout=10)
        out, err = proc.communicate(timeout=300)
    finally:
        if server.poll() is None:
            server.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err + out, err[-4000:]
    assert "zsad resume s3://out/runs/gone" in err + out
    assert "run failed:" in err and "127.0.0.1" in err
    assert "run.json could not be written" in err + out  # the storage is gone: said so


def test_a_second_run_with_the_same_run_id_is_refused_while_the_first_holds_the_lease(tmp_path):
    """Defect 6: the second run said "was interrupted; continue it with --resume" while the first was
    still running, and with --resume both redid every shard."""
    import time

    from tests.helpers.badfiles import write_good_images

    write_good_images(tmp_path / "in" / "parts", 120, size=(32, 32))
    args = [
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "same",
        "--no-evaluate",
        "--set",
        "shard_size=20",
    ]
    first = popen(*args, "--quiet", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lease = tmp_path / "out" / "same" / "_lease.json"
    deadline = time.monotonic() + 120
    while not lease.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert lease.exists(), "the first run took no lease"
    holder = json.loads(lease.read_text())
    second = _zsad(*args, timeout=120)
    resumed = _zsad(*args, "--resume", timeout=120)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    # --quiet: no progress and no log lines of the driver; the summary stays
    # (Ray's own lines are not zsad's to drop yet)
    assert "progress:" not in err and "[zsad] run same:" not in err and "[zsad] starting" not in err
    assert "run same: succeeded" in out
    for res in (second, resumed):
        assert res.returncode == 2, res.stderr[-2000:]
        assert (
            f"run same is in progress (since {holder['started']}, on {holder['host']} pid {holder['pid']})"
            in res.stderr
        )
    assert not lease.exists()  # released at the end
    record = json.loads((tmp_path / "out" / "same" / "run.json").read_text())
    assert record["status"] == "succeeded" and record["counts"]["images"] == 120
