"""The Ray Jobs commands of ``zsad``: submit, status, logs and stop a run on a Ray cluster.

They are commands of the one typer app, :data:`pipeline.cli.core.app`: ``pipeline.cli`` imports this
module, which registers them. The Jobs API client and the run's attempts live in
:mod:`pipeline.runtime.jobs`; exit codes are those of :mod:`pipeline.cli.core`.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from pipeline.cli.core import (
    EvaluateOption,
    InputOption,
    LayoutOption,
    OutputOption,
    ReferenceOption,
    ResumeOption,
    RunIdOption,
    SetOption,
    TinyOption,
    app,
    check_layout,
    check_spec,
    err,
    load_or_exit,
    log,
    needs_run_id,
    spec_sets,
)

_JOBS_ADDRESS_HELP = ("Ray Jobs API (the dashboard), e.g. http://HEAD:8265; default: $RAY_API_SERVER_ADDRESS or "
                      "$RAY_ADDRESS.")
_JOBS_ENVVARS = ["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"]


def _jobs_client(address: Optional[str]):
    from pipeline.runtime import jobs

    try:
        return jobs.client(address)
    except jobs.JobsError as exc:
        err(str(exc))
        raise typer.Exit(exc.exit_code)


def _jobs_call(fn, *args, **kwargs):
    from pipeline.runtime import jobs

    try:
        return fn(*args, **kwargs)
    except jobs.JobsError as exc:
        err(str(exc))
        raise typer.Exit(exc.exit_code)


def _when(seconds: Optional[float]) -> str:
    import datetime as dt

    if not seconds:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _parse_env(pairs: List[str]) -> dict:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            err(f"--env {pair!r}: use KEY=VALUE")
            raise typer.Exit(2)
        env[key] = value
    return env


def _exit_for(attempt) -> int:
    return 0 if attempt.status == "SUCCEEDED" else (2 if attempt.exit_code == 2 else 1)


@app.command()
def submit(
    job: str = typer.Argument(..., help="Job spec YAML; it is resolved here (with --set) and shipped to the cluster."),
    input: InputOption = ...,
    output: OutputOption = ...,
    address: Optional[str] = typer.Option(None, "--address", envvar=_JOBS_ENVVARS, help=_JOBS_ADDRESS_HELP),
    run_id: RunIdOption = None,
    layout: LayoutOption = "auto",
    set_: SetOption = [],
    reference: ReferenceOption = None,
    env: List[str] = typer.Option([], "--env", help="Environment variable for the job's driver and workers: "
                                                    "KEY=VALUE (repeatable)."),
    evaluate: EvaluateOption = True,
    wait: bool = typer.Option(False, "--wait/--no-wait", help="Follow the job's logs until it ends; exit with its "
                                                              "outcome."),
    retries: int = typer.Option(0, "--retries", min=0, help="Resubmit a failed job up to N times with --resume "
                                                            "(implies --wait)."),
    resume: ResumeOption = False,
    tiny: TinyOption = False,
) -> None:
    """Submit a run to a Ray cluster through Ray Jobs (the run id is the submission id)."""
    from pipeline.io.fs import storage_options
    from pipeline.runtime import jobs
    from pipeline.runtime.ids import check_run_id, new_run_id

    check_layout(layout)
    spec = load_or_exit(job, spec_sets(set_, reference), tiny=tiny)
    if spec.runtime.executor != "ray":
        err(f"invalid job spec {job}: runtime.executor is {spec.runtime.executor}, but a submitted run runs on the "
             "cluster's Ray (set runtime.executor: ray, or use zsad run --executor local on this machine)")
        raise typer.Exit(2)
    check_spec(spec, job)
    needs_run_id(resume, run_id)
    run_id = run_id or new_run_id()
    problem = check_run_id(run_id)
    if problem:
        err(problem)
        raise typer.Exit(2)
    variables = _parse_env(env)
    client = _jobs_client(address)
    first = 1
    if resume:
        earlier = _jobs_call(jobs.attempts, client, run_id)
        if earlier and not earlier[-1].terminal:
            err(f"run {run_id} is still {earlier[-1].status} (attempt {earlier[-1].attempt}); stop it first or "
                "follow it")
            raise typer.Exit(2)
        first = len(earlier) + 1
    for uri, name in ((input, "--input"), (output, "--output")):
        if not uri.startswith(("s3://", "s3a://", "gs://", "http://", "https://")):
            log(f"{name} {uri} is a local path: it must exist on the cluster's head and workers")
    sid = _jobs_call(jobs.submit, client, spec, input, output, run_id, attempt=first, resume=resume, layout=layout,
                     evaluate=evaluate, env=variables)
    typer.echo(f"submitted run {run_id} (submission {sid})")
    typer.echo(f"  follow: zsad logs {run_id} --follow   status: zsad status {run_id}   stop: zsad stop {run_id}")
    if not (wait or retries):
        return
    storage = storage_options(spec.storage)
    attempt = _jobs_call(jobs.latest, client, run_id, address)
    for number in range(1, retries + 2):
        attempt = _jobs_call(jobs.follow, client, attempt, lambda chunk: typer.echo(chunk, nl=False))
        why = f" ({attempt.message})" if attempt.status == "FAILED" else ""
        log(f"run {run_id} attempt {attempt.attempt}: {attempt.status}{why}")
        if attempt.status != "FAILED" or number > retries:
            break
        why_not = jobs.retry_decision(attempt, jobs.run_record(attempt, storage))
        if why_not:
            log(f"not retrying: {why_not}")
            break
        again = jobs.plan_exists(attempt, storage) is not False  # unknown: the run folder is on the cluster side
        sid = _jobs_call(jobs.submit, client, spec, input, output, run_id, attempt=attempt.attempt + 1, resume=again,
                         layout=layout, evaluate=evaluate, env=variables)
        log(f"retry {number}/{retries}: resubmitted as {sid}" + (" with --resume" if again else ""))
        attempt = _jobs_call(jobs.latest, client, run_id, address)
    raise typer.Exit(_exit_for(attempt))


@app.command()
def status(
    run_id: str = typer.Argument(..., help="The run id given or printed by zsad submit."),
    address: Optional[str] = typer.Option(None, "--address", envvar=_JOBS_ENVVARS, help=_JOBS_ADDRESS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the attempts (and run.json when readable) as JSON."),
) -> None:
    """Status of a submitted run: every attempt, and the run's counts when its output is readable from here."""
    import json

    from pipeline.io.fs import storage_options
    from pipeline.runtime import jobs

    client = _jobs_client(address)
    found = _jobs_call(jobs.attempts, client, run_id, required=True, address=address)
    last = found[-1]
    record = jobs.run_record(last, storage_options()) if last.terminal else None
    if as_json:
        typer.echo(json.dumps({"run_id": run_id, "status": last.status, "attempts": [a.as_dict() for a in found],
                               "run": record}, indent=2, default=str))
        return
    typer.echo(f"run {run_id}: {last.status} (attempt {last.attempt} of {len(found)})")
    for a in found:
        line = (f"  attempt {a.attempt}  {a.submission_id}  {a.status:<9}  started {_when(a.start_time)}  "
                f"ended {_when(a.end_time)}")
        if a.exit_code is not None:
            line += f"  exit {a.exit_code}"
        typer.echo(line)
        if a.status in ("FAILED", "STOPPED") and a.message:
            typer.echo(f"    {a.message.strip().splitlines()[0]}")
    typer.echo(f"  input: {last.input}\n  output: {last.output}/{run_id}")
    if record:
        c = record.get("counts", {})
        typer.echo(f"  run.json: {record.get('status')}  images {c.get('images')}  ok {c.get('ok')}  "
                   f"failed {c.get('failed')}"
                   + (f"  reason: {record['reason']}" if record.get("reason") else ""))
        if record.get("random_weights"):
            typer.echo("  NOTE: random model weights: these scores are not meaningful anomaly detection results")


@app.command()
def logs(
    run_id: str = typer.Argument(..., help="The run id given or printed by zsad submit."),
    address: Optional[str] = typer.Option(None, "--address", envvar=_JOBS_ENVVARS, help=_JOBS_ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f",
                                help="Stream until the job ends; exit 0 if it succeeded, else 1."),
    attempt: Optional[int] = typer.Option(None, "--attempt", min=1, help="Which attempt (default: the latest)."),
) -> None:
    """The driver log of a submitted run (its latest attempt unless --attempt)."""
    from pipeline.runtime import jobs

    client = _jobs_client(address)
    found = _jobs_call(jobs.attempts, client, run_id, required=True, address=address)
    chosen = found[-1] if attempt is None else next((a for a in found if a.attempt == attempt), None)
    if chosen is None:
        err(f"run {run_id} has no attempt {attempt} (it has {len(found)})")
        raise typer.Exit(2)
    if not follow:
        typer.echo(_jobs_call(jobs.logs, client, chosen), nl=False)
        return
    final = _jobs_call(jobs.follow, client, chosen, lambda chunk: typer.echo(chunk, nl=False))
    log(f"run {run_id} attempt {final.attempt}: {final.status}")
    raise typer.Exit(_exit_for(final))


@app.command()
def stop(
    run_id: str = typer.Argument(..., help="The run id given or printed by zsad submit."),
    address: Optional[str] = typer.Option(None, "--address", envvar=_JOBS_ENVVARS, help=_JOBS_ADDRESS_HELP),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the job to stop."),
) -> None:
    """Stop a submitted run. Finished shards are kept; `zsad submit ... --run-id RUN_ID --resume` continues it."""
    from pipeline.runtime import jobs

    client = _jobs_client(address)
    last = _jobs_call(jobs.latest, client, run_id, address)
    if last.terminal:
        typer.echo(f"run {run_id} is already {last.status} (attempt {last.attempt}); nothing to stop")
        return
    final = _jobs_call(jobs.stop, client, last, timeout_s=timeout)
    typer.echo(f"run {run_id} attempt {final.attempt}: {final.status}")
    if not final.terminal:
        err(f"run {run_id} did not stop within {timeout:g} s (still {final.status})")
        raise typer.Exit(1)
