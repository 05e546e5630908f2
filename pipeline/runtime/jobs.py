"""Ray Jobs: submit a zsad run to a remote cluster, and watch, follow or stop it by run id.

A submission is ``zsad run job.yaml --input I --output O --run-id RUN_ID --address auto`` executed
on the cluster's head by Ray's job supervisor. The job spec travels in the runtime environment: it
is written (fully resolved, ``--set`` overrides applied) to ``job.yaml`` in a fresh folder that is
the job's ``working_dir``; storage secrets never go into that file, they travel as the job's
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``). zsad itself must be
installed on the cluster's nodes (cluster.yaml's setup commands do that).

Attempts: the first attempt's submission id is the run id itself; a retry (``zsad submit
--retries N``) is a new submission ``RUN_ID--attempt-K`` of ``zsad run ... --resume``, so finished
shards are kept and only missing ones are scored. Every submission carries metadata
``zsad_run_id``, ``zsad_attempt``, ``zsad_input`` and ``zsad_output``, which is how ``status``,
``logs`` and ``stop`` find a run's attempts.

Only ``ray.job_submission`` is imported here (no torch, no Ray Data): the client side is light.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from pipeline.config import JobSpec
from pipeline.errors import ZsadError
from pipeline.io import fs as fsio
from pipeline.io.retry import backoff_delays, is_transient

ATTEMPT_SEP = "--attempt-"
SUBMIT_RETRIES = 6  # about a minute of waiting for a head whose job agent is still starting
_BUSY = ("try again later", "No available agent", "Connection refused", "503")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(ZsadError, RuntimeError):
    """A Jobs API problem; the message says what and where (CLI exit code ``exit_code``, 2 unless given)."""

    exit_code = 2


@dataclass(frozen=True)
class Attempt:
    """One submission of a run."""

    run_id: str
    attempt: int
    submission_id: str
    status: str
    message: str
    exit_code: int | None
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    input: str
    output: str

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def submission_id(run_id: str, attempt: int) -> str:
    return run_id if attempt == 1 else f"{run_id}{ATTEMPT_SEP}{attempt}"


def client(address: str | None):
    """A JobSubmissionClient for the cluster's dashboard address (``http://HEAD:8265``); ``None``
    uses Ray's own resolution (``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS``). Token authentication
    (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) is handled by Ray's client."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection refused, bad address, auth
        where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "(no address)"
        raise JobsError(f"cannot reach the Ray Jobs API at {where}: {exc}") from None


def _absolute(uri: str) -> str:
    return uri if fsio.is_remote(uri) else os.path.abspath(uri)


def entrypoint(
    input_uri: str, output_uri: str, run_id: str, *, resume: bool = False, layout: str = "auto", evaluate: bool = True
) -> str:
    """The shell command the cluster runs for one attempt (spec file ``job.yaml`` in the working dir)."""
    args = [
        "zsad",
        "run",
        "job.yaml",
        "--input",
        input_uri,
        "--output",
        output_uri,
        "--run-id",
        run_id,
        "--address",
        "auto",
        "--layout",
        layout,
    ]
    if resume:
        args.append("--resume")
    if not evaluate:
        args.append("--no-evaluate")
    return shlex.join(args)


def spec_yaml(spec: JobSpec) -> str:
    """The fully resolved spec as YAML (what the cluster runs; loads back to an equal spec)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


#: storage secrets of a spec -> the environment variables that carry them to the job instead
SECRET_ENV = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY"}


def without_secrets(spec: JobSpec) -> tuple[JobSpec, dict[str, str]]:
    """(the spec with its storage secrets removed, those secrets as environment variables). Secrets
    never go into the shipped job.yaml: the job gets them in its runtime environment's variables,
    where zsad's storage settings find them (``storage`` keys left unset fall back to AWS_*)."""
    secrets = {env: getattr(spec.storage, key) for key, env in SECRET_ENV.items() if getattr(spec.storage, key)}
    if not secrets:
        return spec, {}
    storage = spec.storage.model_copy(update={key: None for key in SECRET_ENV})
    return spec.model_copy(update={"storage": storage}), secrets


def write_working_dir(folder: str, spec: JobSpec, run_id: str, attempt: int) -> dict[str, str]:
    """Write the job's working directory (``job.yaml``, without secrets) into ``folder``; returns
    the environment variables that carry the secrets."""
    shipped, secrets = without_secrets(spec)
    with open(os.path.join(folder, "job.yaml"), "w", encoding="utf-8") as fh:
        fh.write(f"# zsad job spec for run {run_id}, attempt {attempt} (resolved by zsad submit)\n")
        fh.write(spec_yaml(shipped))
    return secrets


def submit(
    jobs,
    spec: JobSpec,
    input_uri: str,
    output_uri: str,
    run_id: str,
    *,
    attempt: int = 1,
    resume: bool = False,
    layout: str = "auto",
    evaluate: bool = True,
    env: dict[str, str] | None = None,
) -> str:
    """Submit one attempt of ``run_id``; returns its submission id."""
    input_uri, output_uri = _absolute(input_uri), _absolute(output_uri)
    sid = submission_id(run_id, attempt)
    with tempfile.TemporaryDirectory(prefix="zsad-submit-") as folder:
        secrets = write_working_dir(folder, spec, run_id, attempt)
        runtime_env: dict[str, Any] = {"working_dir": folder}
        if env or secrets:
            runtime_env["env_vars"] = {**(env or {}), **secrets}
        metadata = {
            "zsad_run_id": run_id,
            "zsad_attempt": str(attempt),
            "zsad_input": input_uri,
            "zsad_output": output_uri,
            "zsad_job": spec.name,
        }
        command = entrypoint(input_uri, output_uri, run_id, resume=resume, layout=layout, evaluate=evaluate)
        for tries, delay in enumerate([*backoff_delays(SUBMIT_RETRIES, 1.0, 15.0), None], start=1):
            try:
                return jobs.submit_job(
                    entrypoint=command, runtime_env=runtime_env, metadata=metadata, submission_id=sid
                )
            except Exception as exc:
                text = str(exc)
                if "already exists" in text:
                    if tries > 1 and _is_ours(jobs, sid, run_id, attempt):  # an earlier try got through
                        return sid
                    raise JobsError(
                        f"run id {run_id!r}: the cluster already has a job {sid!r}; choose another --run-id "
                        f"(or `zsad status {run_id}`)"
                    ) from None
                busy = any(m in text for m in _BUSY) or is_transient(exc)
                if not busy or delay is None:
                    raise JobsError(f"submitting run {run_id} failed: {text}") from None
                time.sleep(delay)  # the head's job agent is starting or busy
    raise AssertionError("unreachable")


def _is_ours(jobs, sid: str, run_id: str, attempt: int) -> bool:
    try:
        meta = jobs.get_job_info(sid).metadata or {}
    except Exception:
        return False
    return meta.get("zsad_run_id") == run_id and meta.get("zsad_attempt") == str(attempt)


def _attempt(info) -> Attempt | None:
    meta = info.metadata or {}
    run_id = meta.get("zsad_run_id")
    if not run_id:
        return None
    status = getattr(info.status, "value", str(info.status))
    ms = lambda t: None if t is None or t == 0 else t / 1000.0  # noqa: E731 - Ray reports milliseconds
    return Attempt(
        run_id=run_id,
        attempt=int(meta.get("zsad_attempt", "1")),
        submission_id=info.submission_id or "",
        status=status,
        message=info.message or "",
        exit_code=getattr(info, "driver_exit_code", None),
        start_time=ms(info.start_time),
        end_time=ms(info.end_time),
        input=meta.get("zsad_input", ""),
        output=meta.get("zsad_output", ""),
    )


def attempts(jobs, run_id: str, *, required: bool = False, address: str | None = None) -> list[Attempt]:
    """Every submission of ``run_id`` on the cluster, first attempt first. With ``required``, a run
    the cluster does not know is a :class:`JobsError`."""
    try:
        infos = jobs.list_jobs()
    except Exception as exc:
        raise JobsError(f"listing the cluster's jobs failed: {exc}") from None
    found = sorted((a for a in map(_attempt, infos) if a is not None and a.run_id == run_id), key=lambda a: a.attempt)
    if required and not found:
        raise JobsError(
            f"no zsad run {run_id!r} on the cluster{f' at {address}' if address else ''} "
            "(zsad submit prints the run id)"
        )
    return found


def latest(jobs, run_id: str, address: str | None = None) -> Attempt:
    return attempts(jobs, run_id, required=True, address=address)[-1]


def refresh(jobs, attempt: Attempt) -> Attempt:
    info = jobs.get_job_info(attempt.submission_id)
    return _attempt(info) or attempt


def wait(jobs, attempt: Attempt, *, poll_s: float = 1.0, timeout_s: float | None = None) -> Attempt:
    """Poll until the attempt is terminal (or ``timeout_s`` passes; then the last state)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        attempt = refresh(jobs, attempt)
        if attempt.terminal or (deadline is not None and time.monotonic() > deadline):
            return attempt
        time.sleep(poll_s)


def logs(jobs, attempt: Attempt) -> str:
    try:
        return jobs.get_job_logs(attempt.submission_id)
    except Exception as exc:
        raise JobsError(f"logs of {attempt.submission_id} could not be read: {exc}") from None


def follow(jobs, attempt: Attempt, write: Callable[[str], None]) -> Attempt:
    """Stream the attempt's driver output to ``write`` until it ends; return its final state."""

    async def pump() -> None:
        async for chunk in jobs.tail_job_logs(attempt.submission_id):
            write(chunk)

    try:
        asyncio.run(pump())
    except Exception:  # noqa: BLE001 - the log socket closed early (dashboard restarted, network): poll instead
        pass
    return wait(jobs, attempt, poll_s=0.5)


def stop(jobs, attempt: Attempt, *, timeout_s: float = 60.0) -> Attempt:
    """Ask Ray to stop a running attempt and wait until it is terminal."""
    if attempt.terminal:
        return attempt
    try:
        jobs.stop_job(attempt.submission_id)
    except Exception as exc:
        raise JobsError(f"stopping {attempt.submission_id} failed: {exc}") from None
    return wait(jobs, attempt, poll_s=0.5, timeout_s=timeout_s)


def run_record(attempt: Attempt, storage=None) -> dict[str, Any] | None:
    """The run's ``run.json`` when the submitter can read the output (None otherwise)."""
    from pipeline.io.sinks import read_json

    if not attempt.output:
        return None
    try:
        return read_json(fsio.join(fsio.normalise(attempt.output), attempt.run_id, "run.json"), storage)
    except Exception:
        return None


def plan_exists(attempt: Attempt, storage=None) -> bool | None:
    """Whether the run's ``_plan.json`` exists (None when the output cannot be read from here)."""
    if not attempt.output:
        return None
    try:
        return fsio.exists(fsio.join(fsio.normalise(attempt.output), attempt.run_id, "_plan.json"), storage)
    except Exception:
        return None


def retry_decision(attempt: Attempt, record: dict[str, Any] | None) -> str | None:
    """Why a FAILED attempt must NOT be resubmitted, or None when a retry can help.

    Not retried: a stopped job (the user asked), bad input or usage (exit code 2: the same input
    fails again), and a run that produced every row but failed its error budget (resuming changes
    nothing). Retried: a driver that crashed, was killed or lost its cluster connection, and a run
    whose plan failed (for example a model-load error that outlived ``retries.model_load``)."""
    if attempt.status == "STOPPED":
        return "the job was stopped"
    if attempt.status != "FAILED":
        return f"the job is {attempt.status}"
    if attempt.exit_code == 2:
        return "zsad refused the input or the spec (exit code 2); fix it and submit again"
    if record and record.get("status") == "failed" and not record.get("counts", {}).get("missing", 1):
        return f"every image has a result and the run failed its error budget: {record.get('reason')}"
    return None
