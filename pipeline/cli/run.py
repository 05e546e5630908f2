"""``zsad run``, ``resume``, ``validate``, ``schema`` and ``demo``: a job over an input, checked, run
and summarised (exit codes: :mod:`pipeline.cli.core`)."""

from __future__ import annotations

import importlib.resources
import os
from typing import List, Optional

import typer

from pipeline.cli.core import (
    EXECUTOR_HELP,
    VERBOSE_HELP,
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
    attempt_log_name,
    captured,
    check_executor,
    check_layout,
    console,
    err,
    evaluate_and_show,
    load_or_exit,
    log,
    needs_run_id,
    report_after_run,
    spec_sets,
    summary,
)
from pipeline.config import SpecError


def run_spec(spec_path: str, input_uri: str, output_uri: str, layout: str, run_id: Optional[str], sets: List[str],
             address: Optional[str], evaluate: bool = True, resume: bool = False, spec=None,
             max_images: Optional[int] = None, categories: Optional[str] = None, dry_run: bool = False,
             quiet: bool = False, verbose: bool = False, executor: Optional[str] = None, tiny: bool = False):
    """Run (or resume) a job and print its summary; evaluate it and write its report while its Ray
    session is still open. Exits 2 for a refused run, the run's exit code when it failed."""
    from pipeline.runtime.run import RunError, run_job

    spec = spec or load_or_exit(spec_path, sets, tiny=tiny)
    if executor is not None:  # --executor: the spec's runtime.executor for this command
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"executor": executor})})
    check_executor(spec.runtime.executor, address)
    picks = {}
    if max_images is not None:
        picks["max_images"] = max_images
    if categories:
        picks["categories"] = tuple(c.strip() for c in categories.split(",") if c.strip())
    if picks:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update=picks)})
    if dry_run:
        import json

        from pipeline.runtime.run import dry_run as plan_only

        try:
            plan = plan_only(spec, input_uri, layout=None if layout == "auto" else layout)
        except RunError as exc:
            err(str(exc))
            raise typer.Exit(exc.exit_code)
        typer.echo(json.dumps(plan, indent=2))
        return None

    from pipeline.io.fs import storage_options

    def summarise_and_evaluate(result) -> None:
        """Runs while the run's Ray session is still open, so the evaluation reuses it."""
        console().keep_at = result.record.get("log")  # also when the evaluation fails
        typer.echo(summary(result))
        try:
            if result.status == "succeeded" and evaluate and result.record.get("labelled_images", 0):
                evaluate_and_show(result.run_dir, storage_options(spec.storage), address,
                                  executor=spec.runtime.executor)
        finally:  # the report also when the run or its evaluation failed: it shows what went wrong
            path = report_after_run(result.run_dir, spec, storage_options(spec.storage))
            if path:
                result.record["report"] = path  # for the caller (demo); run.json is not rewritten

    with captured(verbose, quiet, storage_options(spec.storage)) as current:
        try:
            result = run_job(
                spec, input_uri, output_uri, run_id=run_id, layout=None if layout == "auto" else layout,
                address=address, resume=resume, log=log, then=summarise_and_evaluate,
                progress_stream=current.progress_stream, log_name=attempt_log_name("resume" if resume else "run"),
            )
        except RunError as exc:
            err(str(exc))
            raise typer.Exit(exc.exit_code)
    if result.already:  # a resume (an operator's retry loop, zsad submit --retries) of a finished run
        typer.echo(f"run {result.run_id} already succeeded (finished at {result.record.get('ended', '?')}); "
                   "nothing to do")
        typer.echo(summary(result))
        return result
    if result.status != "succeeded":
        raise typer.Exit(result.exit_code or 1)
    return result


@app.command()
def run(
    job: str = typer.Argument(..., help="Job spec YAML (e.g. jobs/smoke.yaml)."),
    input: InputOption = ...,
    output: OutputOption = ...,
    layout: LayoutOption = "auto",
    run_id: RunIdOption = None,
    set_: SetOption = [],
    address: Optional[str] = typer.Option(None, "--address",
                                          help="Ray cluster address; default: start a local Ray for the run."),
    evaluate: EvaluateOption = True,
    resume: ResumeOption = False,
    skip_scored: Optional[str] = typer.Option(
        None, "--skip-scored", help="Score only inputs not already scored ok (same uri, size, etag/mtime) by runs "
                                    "under this OUTPUT."),
    reference: ReferenceOption = None,
    max_images: Optional[int] = typer.Option(
        None, "--max-images", min=1, help="Score only the first N listed images (sorted by URI); the spec's "
                                          "data.max_images."),
    categories: Optional[str] = typer.Option(
        None, "--categories", help="Score only these categories, comma-separated (e.g. bottle,cable); the spec's "
                                   "data.categories."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List the input and check the spec and the plan, then print the plan (stages, "
                                 "resources, images, tables) as JSON to stdout; nothing is scored or written."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress and no log lines of the driver; errors and the summary still print."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    executor: Optional[str] = typer.Option(None, "--executor", help=EXECUTOR_HELP),
    tiny: TinyOption = False,
) -> None:
    """Run a job over an input and write Parquet tables under OUTPUT/RUN_ID/."""
    check_layout(layout)
    if quiet and verbose:
        err("--quiet and --verbose cannot be used together")
        raise typer.Exit(2)
    needs_run_id(resume, run_id)
    run_spec(job, input, output, layout, run_id, spec_sets(set_, reference, skip_scored), address, evaluate, resume,
             max_images=max_images, categories=categories, dry_run=dry_run, quiet=quiet, verbose=verbose,
             executor=executor, tiny=tiny)


@app.command("resume")
def resume_cmd(
    run_dir: str = typer.Argument(..., help="The interrupted run: OUTPUT/RUN_ID (local or s3://)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local Ray."),
    evaluate: EvaluateOption = True,
    set_: List[str] = typer.Option([], "--set", help="storage.* overrides only (endpoint, credentials, region): "
                                   "they reach the data without changing results; any other key is refused."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
    executor: Optional[str] = typer.Option(
        None, "--executor", help="What runs the rest of the plan: ray or local; default: what the run was started "
                                 "with. Results are the same."),
) -> None:
    """Continue an interrupted run with the spec it was started with (shards without a done marker)."""
    from pydantic import ValidationError

    from pipeline.config import (
        StorageSpec,
        apply_overrides,
        parse_override,
        spec_from_dict,
    )
    from pipeline.io import fs as fsio
    from pipeline.io.sinks import read_json

    try:
        refused = [text for text in set_ if parse_override(text)[0][0] != "storage"]
        storage = StorageSpec.model_validate(apply_overrides({"storage": {}}, set_)["storage"])
    except (SpecError, ValidationError) as exc:
        err(f"zsad resume --set: {exc}")
        raise typer.Exit(2)
    if refused:
        err(f"zsad resume --set takes storage.* keys only (the run keeps the spec it was started with); refused: "
            f"{', '.join(refused)}")
        raise typer.Exit(2)
    run_dir = fsio.normalise(run_dir)
    try:
        plan = read_json(fsio.join(run_dir, "_plan.json"), fsio.storage_options(storage))
    except FileNotFoundError:
        err(f"nothing to resume at {run_dir}: no _plan.json")
        raise typer.Exit(2)
    data = plan["spec"]
    for key in ("access_key_id", "secret_access_key"):  # redacted in the plan: the overrides or the environment
        if data.get("storage", {}).get(key) == "***":
            data["storage"][key] = None
    try:
        spec = spec_from_dict(apply_overrides(data, set_), f"{run_dir}/_plan.json")
    except SpecError as exc:
        err(str(exc))
        raise typer.Exit(2)
    parent, run_id = run_dir.rstrip("/").rsplit("/", 1)
    run_spec("", plan["input"], parent, "auto", run_id, [], address, evaluate, True, spec=spec, verbose=verbose,
             executor=executor)


@app.command()
def validate(
    jobs: List[str] = typer.Argument(..., help="Job spec files to check."),
    set_: List[str] = typer.Option([], "--set", help="Overrides applied to every file before checking."),
    tiny: bool = typer.Option(False, "--tiny",
                              help="Check each file as --tiny runs it (the tiny random-weight models)."),
) -> None:
    """Check job specs without running them (unknown keys, types, the random-weights gate, model
    names and tags, local weight files exist, local prompt files parse)."""
    from pipeline.config import TrainSpec, is_training_spec, load_spec
    from pipeline.runtime.preflight import spec_problem

    failed = 0
    for path in jobs:
        try:
            training = is_training_spec(path)
            spec = load_spec(path, set_, model=TrainSpec if training else None, tiny=tiny)
        except SpecError as exc:
            failed += 1
            err(str(exc))
            continue
        problem = spec_problem(spec)
        if problem:
            failed += 1
            err(f"invalid job spec {path}:\n  {problem}")
            continue
        weights = spec.clip.weights.describe() if spec.clip.weights else "random (allowed)"
        what = (f"training: adapters on layers {list(spec.adapters.layers)}, {spec.train.epochs} epochs" if training
                else f"{spec.score.kind} + pixel {spec.pixel.kind}")
        typer.echo(f"ok  {path}  ({spec.name}: {what}, clip {spec.clip.model}, weights {weights})")
    if failed:
        raise typer.Exit(2)


@app.command()
def schema(table: Optional[str] = typer.Argument(
        None, help="Table name (scores, errors, inputs, masks, foreground, tiles, metrics); default: all.")) -> None:
    """Print the table contracts (columns, Arrow types, nullability, docs)."""
    from pipeline.io import contracts

    names = [table] if table else contracts.table_names()
    try:
        texts = [contracts.describe(contracts.load(n)) for n in names]
    except contracts.ContractError as exc:
        err(str(exc))
        raise typer.Exit(2)
    typer.echo("\n\n".join(texts))


def preset_path(name: str) -> str:
    """Path of a bundled preset (``smoke`` -> .../jobs/smoke.yaml)."""
    res = importlib.resources.files("pipeline._jobs") / f"{name}.yaml"
    if not res.is_file():
        raise FileNotFoundError(name)
    return str(res)


@app.command()
def demo(
    output: str = typer.Option("demo-output", "--output", "-o", help="Output root for the demo run."),
    data: str = typer.Option("demo-data", "--data", help="Where the synthetic dataset is generated."),
    job: Optional[str] = typer.Option(None, "--job", help="Job spec (default: the bundled jobs/smoke.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Spec overrides."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
) -> None:
    """Generate a small synthetic MVTec-style dataset and run the smoke job on it with a local Ray."""
    from pipeline.synthetic import make_dataset

    info = make_dataset(data)
    log(f"generated synthetic dataset at {os.path.abspath(data)}: {info}")
    result = run_spec(job or preset_path("smoke"), data, output, "auto", None, set_, None, verbose=verbose)
    import pandas as pd

    scores = pd.read_parquet(os.path.join(result.run_dir, "scores"))
    ok = scores[scores["status"] == "ok"]
    by_cat = ok.groupby(["category", "gt_label"], dropna=False)["score"].agg(["count", "mean"]).reset_index()
    typer.echo("\nmean score per category and ground-truth label (random weights: NOT a result):")
    typer.echo(by_cat.to_string(index=False))
    typer.echo(f"\nload the tables with:  pandas.read_parquet('{result.run_dir}/scores')")
    if result.record.get("report"):
        typer.echo(f"open the report:      {result.record['report']}")
