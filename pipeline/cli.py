"""The ``zsad`` command line (typer). The Ray Jobs commands (submit, status, logs, stop) live in
:mod:`pipeline.cli_jobs` and are registered on the same :data:`app`.

Exit codes: 0 success; 1 the run completed but failed (error budget exceeded, a stage failed);
2 bad usage or input (invalid spec, empty or unreachable input, output not writable).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import sys
from typing import Iterator, List, Optional, get_args

import typer

from pipeline.config import DataSpec, SpecError, load_spec

app = typer.Typer(
    name="zsad",
    help="Distributed batch pipeline for zero- and few-shot visual anomaly detection.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: --executor and --tiny, as run, resume, evaluate, train and validate take them
_EXECUTOR_HELP = ("What runs the plan: ray (a local Ray for this command, or the cluster at --address) or local (this "
                  "process, no Ray: a quick look at a few images, debugging, tests); default: the spec's runtime.executor "
                  "(ray). Results are the same.")
_TINY_HELP = ("Run the spec on the tiny random-weight models (CLIP zsad-tiny, tiny SAM, random adapters, small layers, "
              "image and map sizes, no GPU requests): try any preset in seconds without its weights. The outputs say "
              "random weights; --set overrides still apply after it.")

#: every layout name, spelled out for --help (rich would cut one long "a|b|c" word)
_LAYOUT_HELP = "auto (detect), " + ", ".join(n for n in get_args(DataSpec.model_fields["layout"].annotation) if n != "auto")


#: where zsad's lines go; a command that starts Ray swaps in its own (see _console)
_CONSOLE = None


def _console():
    from pipeline.runtime.console import Console

    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = Console()
    return _CONSOLE


@contextlib.contextmanager
def _captured(verbose: bool, quiet: bool = False, storage=None) -> Iterator:
    """For the block: Ray's own output (warnings, core worker lines, Ray Data's INFO lines, the
    workers' lines) goes to a log file instead of the terminal, unless ``verbose``
    (:mod:`pipeline.runtime.console`). Yields the console; set its ``keep_at`` to the URI the log
    is copied to when the block ends (the last line says where it is, or where it stayed when the
    copy failed). Without one (the run was refused) the log is removed unless Ray wrote to it
    (then its place is said)."""
    from pipeline.runtime.console import Console

    global _CONSOLE
    previous, _CONSOLE = _CONSOLE, Console(verbose=verbose, quiet=quiet)
    console = _CONSOLE
    try:
        with console.captured():
            yield console
    finally:
        _CONSOLE = previous
        if console.keep_at:
            # said after the copy, so that a log that could not be copied is never named as kept
            note = console.keep(console.keep_at, storage)
            if not note:
                typer.echo(f"  log (Ray's own output too): {console.keep_at}")
        else:
            note = console.discard()
        if note:
            _err(note)


def _err(message: str) -> None:
    _console().error(message)


def _log(message: str) -> None:
    _console().say(message)


def _attempt_log_name(kind: str) -> str:
    """``RUN/logs/<kind>-<UTC time>.log``: one log per attempt (run, resume, evaluate)."""
    import datetime as dt

    return f"{kind}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.log"


def _summary(result) -> str:
    m = result.record
    lines = [
        f"run {result.run_id}: {result.status}",
        f"  images: {result.n_images}  ok: {result.n_ok}  failed: {result.n_failed} ({100 * result.error_rate:.1f}%)",
        f"  wall time: {m.get('wall_seconds', 0):.1f} s",
        f"  tables:  {result.run_dir}/scores/  {result.run_dir}/errors/  {result.run_dir}/inputs.parquet"
        + "".join(f"  {result.run_dir}/{t}/" for t in ("masks", "foreground", "tiles", "embeddings") if m.get("tables", {}).get(t)),
        f"  run record: {result.run_dir}/run.json",
    ]
    if m.get("skipped_at_listing"):
        from pipeline.runtime.run import skipped_text

        lines.append(f"  left out at listing: {skipped_text(m['skipped_at_listing'])}")
    if m.get("random_weights"):
        lines.append("  NOTE: random model weights: these scores are not meaningful anomaly detection results")
    if m.get("reason"):
        lines.append(f"  reason: {m['reason']}")
    return "\n".join(lines)


def _check_executor(executor: str, address: Optional[str]) -> None:
    """Exit 2 unless ``executor`` is ray or local, and local comes without --address."""
    from pipeline.runtime.executors import ExecutorError, check

    try:
        check(executor, address)
    except ExecutorError as exc:
        _err(str(exc))
        raise typer.Exit(2)


def _evaluate(run_dir: str, storage, address: Optional[str], executor: str = "ray", **kwargs):
    from pipeline.runtime.evaluate import EvaluationError, evaluate_run

    try:
        table = evaluate_run(run_dir, storage=storage, address=address, log=_log, executor=executor, **kwargs)
    except EvaluationError as exc:
        _err(str(exc))
        raise typer.Exit(2)
    shown = table[["category", "n_images", "image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "pixel_aupro"]]
    typer.echo(f"\nmetrics: {run_dir}/metrics/  {run_dir}/metrics.md")
    if bool(table["random_weights"].iloc[0]):
        typer.echo("  (random model weights: these numbers are NOT anomaly-detection results)")
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


def _run(spec_path: str, input_uri: str, output_uri: str, layout: str, run_id: Optional[str], sets: List[str], address: Optional[str],
         evaluate: bool = True, resume: bool = False, spec=None, max_images: Optional[int] = None,
         categories: Optional[str] = None, dry_run: bool = False, quiet: bool = False, verbose: bool = False,
         executor: Optional[str] = None, tiny: bool = False):
    from pipeline.runtime.run import RunError, run_job

    try:
        spec = spec or load_spec(spec_path, sets, tiny=tiny)
    except SpecError as exc:
        _err(str(exc))
        raise typer.Exit(2)
    if executor is not None:  # --executor: the spec's runtime.executor for this command
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"executor": executor})})
    _check_executor(spec.runtime.executor, address)
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
            _err(str(exc))
            raise typer.Exit(exc.exit_code)
        typer.echo(json.dumps(plan, indent=2))
        return None
    def summarise_and_evaluate(result) -> None:
        """Runs while the run's Ray session is still open, so the evaluation reuses it."""
        _console().keep_at = result.record.get("log")  # also when the evaluation fails
        typer.echo(_summary(result))
        from pipeline.cli_report import report_after_run
        from pipeline.io.fs import storage_options

        try:
            if result.status == "succeeded" and evaluate and result.record.get("labelled_images", 0):
                _evaluate(result.run_dir, storage_options(spec.storage), address, executor=spec.runtime.executor)
        finally:  # the report also when the run or its evaluation failed: it shows what went wrong
            path = report_after_run(result.run_dir, spec, storage_options(spec.storage))
            if path:
                result.record["report"] = path  # for the caller (demo); run.json is not rewritten

    from pipeline.io.fs import storage_options

    with _captured(verbose, quiet, storage_options(spec.storage)) as console:
        try:
            result = run_job(
                spec, input_uri, output_uri, run_id=run_id, layout=None if layout == "auto" else layout, address=address,
                resume=resume, log=_log, then=summarise_and_evaluate, progress_stream=console.progress_stream,
                log_name=_attempt_log_name("resume" if resume else "run"),
            )
        except RunError as exc:
            _err(str(exc))
            raise typer.Exit(exc.exit_code)
    if result.already:  # a resume (an operator's retry loop, zsad submit --retries) of a finished run
        typer.echo(f"run {result.run_id} already succeeded (finished at {result.record.get('ended', '?')}); nothing to do")
        typer.echo(_summary(result))
        return result
    if result.status != "succeeded":
        raise typer.Exit(result.exit_code or 1)
    return result


@app.command()
def run(
    job: str = typer.Argument(..., help="Job spec YAML (e.g. jobs/smoke.yaml)."),
    input: str = typer.Option(..., "--input", "-i", help="Input: a local folder or file, or an s3:// URI (bucket and prefix)."),
    output: str = typer.Option(..., "--output", "-o", help="Output root: a local folder or an s3:// URI (bucket and prefix)."),
    layout: str = typer.Option("auto", "--layout", help=f"Input layout: {_LAYOUT_HELP}."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run id (folder under OUTPUT); default: UTC time + random suffix."),
    set_: List[str] = typer.Option([], "--set", help="Override a spec key: dotted.key=value (repeatable)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: start a local Ray for the run."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Evaluate when the input layout carries labels."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run --run-id: rerun only shards without a done marker."),
    skip_scored: Optional[str] = typer.Option(None, "--skip-scored", help="Score only inputs not already scored ok (same uri, size, etag/mtime) by runs under this OUTPUT."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Few-shot reference images (normal, per category): a folder per category, a dataset root (its train split: mvtec, visa, mpdd, btad) or a manifest; the spec's few_shot.reference (turns few-shot on with its defaults when the spec has no few_shot section)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", min=1, help="Score only the first N listed images (sorted by URI); the spec's data.max_images."),
    categories: Optional[str] = typer.Option(None, "--categories", help="Score only these categories, comma-separated (e.g. bottle,cable); the spec's data.categories."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the input and check the spec and the plan, then print the plan (stages, resources, images, tables) as JSON to stdout; nothing is scored or written."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no log lines of the driver; errors and the summary still print."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's own output (warnings, core worker and Ray Data lines, the workers' lines) on the terminal; it is always in the run's log, RUN/logs/."),
    executor: Optional[str] = typer.Option(None, "--executor", help=_EXECUTOR_HELP),
    tiny: bool = typer.Option(False, "--tiny", help=_TINY_HELP),
) -> None:
    """Run a job over an input and write Parquet tables under OUTPUT/RUN_ID/."""
    _check_layout(layout)
    if quiet and verbose:
        _err("--quiet and --verbose cannot be used together")
        raise typer.Exit(2)
    if resume and not run_id:
        _err("--resume needs --run-id (the run to continue)")
        raise typer.Exit(2)
    if skip_scored:
        set_ = [*set_, f"skip_scored={skip_scored}"]
    if reference:
        set_ = [*set_, f"few_shot.reference={reference}"]
    _run(job, input, output, layout, run_id, set_, address, evaluate, resume, max_images=max_images, categories=categories,
         dry_run=dry_run, quiet=quiet, verbose=verbose, executor=executor, tiny=tiny)


@app.command("train")
def train_cmd(
    job: str = typer.Argument(..., help="Training spec YAML (e.g. jobs/train_aprilgan.yaml)."),
    input: str = typer.Option(..., "--input", "-i", help="Labelled input with masks (mvtec, visa, or a manifest with mask_uri): a local folder or s3:// URI."),
    output: str = typer.Option(..., "--output", "-o", help="Output root: checkpoints, the final adapters and train.json go under OUTPUT/TRAIN_ID/."),
    layout: str = typer.Option("auto", "--layout", help=f"Input layout: {_LAYOUT_HELP}."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Training id (folder under OUTPUT); default: UTC time + random suffix."),
    set_: List[str] = typer.Option([], "--set", help="Override a spec key: dotted.key=value (repeatable)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local Ray."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted training --run-id after its last finished epoch."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's own output on the terminal; it is always in OUTPUT/TRAIN_ID/logs/."),
    tiny: bool = typer.Option(False, "--tiny", help=_TINY_HELP),
) -> None:
    """Train APRIL-GAN adapters on a frozen CLIP with Ray Train; prints the adapters' path and sha256."""
    from pipeline.config import TrainSpec
    from pipeline.io.fs import storage_options
    from pipeline.runtime.train import TrainError, train_job

    _check_layout(layout)
    if resume and not run_id:
        _err("--resume needs --run-id (the training to continue)")
        raise typer.Exit(2)
    if layout != "auto":
        set_ = [*set_, f"data.layout={layout}"]
    try:
        spec = load_spec(job, set_, model=TrainSpec, tiny=tiny)
    except SpecError as exc:
        _err(str(exc))
        raise typer.Exit(2)
    from pipeline.io import fs as fsio
    from pipeline.runtime.ids import new_run_id
    from pipeline.runtime.train import PLAN

    run_id = run_id or new_run_id()
    train_dir = fsio.join(fsio.normalise(output), run_id)
    storage = storage_options(spec.storage)
    with _captured(verbose, storage=storage) as console:
        try:
            result = train_job(spec, input, output, run_id=run_id, resume=resume, address=address, log=_log)
        except TrainError as exc:
            _err(str(exc))
            try:  # a training that had started keeps its log in its folder
                if fsio.exists(fsio.join(train_dir, PLAN), storage):
                    console.keep_at = fsio.join(train_dir, "logs", _attempt_log_name("train"))
            except Exception:  # noqa: BLE001 - the storage may be what failed; the local log is named then
                pass
            raise typer.Exit(exc.exit_code)
        if not result.already:  # a resume that found the training finished writes nothing, not even a log
            console.keep_at = fsio.join(train_dir, "logs", _attempt_log_name("train"))
    losses = " ".join(f"{x['loss']:.4f}" for x in result.record["losses"])
    if result.already:
        typer.echo(f"train {result.train_id} already finished (at {result.record.get('ended', '?')}); nothing to do")
    typer.echo(f"train {result.train_id}: succeeded in {result.record['wall_seconds']:.1f} s")
    typer.echo(f"  loss per epoch: {losses}")
    typer.echo(f"  adapters: {result.adapters_uri}")
    typer.echo(f"  sha256:   {result.sha256}")
    typer.echo(f"  record:   {result.train_dir}/train.json")
    if result.record["random_weights"]:
        typer.echo("  NOTE: random CLIP weights: these adapters are NOT meaningful")
    typer.echo(f"  use them: --set pixel.weights={result.adapters_uri}")


@app.command("resume")
def resume_cmd(
    run_dir: str = typer.Argument(..., help="The interrupted run: OUTPUT/RUN_ID (local or s3://)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local Ray."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Evaluate when the input layout carries labels."),
    set_: List[str] = typer.Option([], "--set", help="storage.* overrides only (endpoint, credentials, region): "
                                   "they reach the data without changing results; any other key is refused."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's own output (warnings, core worker and Ray Data lines, the workers' lines) on the terminal; it is always in the run's log, RUN/logs/."),
    executor: Optional[str] = typer.Option(None, "--executor", help="What runs the rest of the plan: ray or local; default: what the run was started with. Results are the same."),
) -> None:
    """Continue an interrupted run with the spec it was started with (shards without a done marker)."""
    from pydantic import ValidationError

    from pipeline.config import StorageSpec, apply_overrides, parse_override, spec_from_dict
    from pipeline.io import fs as fsio
    from pipeline.io.sinks import read_json

    try:
        refused = [text for text in set_ if parse_override(text)[0][0] != "storage"]
        storage = StorageSpec.model_validate(apply_overrides({"storage": {}}, set_)["storage"])
    except (SpecError, ValidationError) as exc:
        _err(f"zsad resume --set: {exc}")
        raise typer.Exit(2)
    if refused:
        _err(f"zsad resume --set takes storage.* keys only (the run keeps the spec it was started with); refused: "
             f"{', '.join(refused)}")
        raise typer.Exit(2)
    run_dir = fsio.normalise(run_dir)
    try:
        plan = read_json(fsio.join(run_dir, "_plan.json"), fsio.storage_options(storage))
    except FileNotFoundError:
        _err(f"nothing to resume at {run_dir}: no _plan.json")
        raise typer.Exit(2)
    data = plan["spec"]
    for key in ("access_key_id", "secret_access_key"):  # redacted in the plan: the overrides or the environment
        if data.get("storage", {}).get(key) == "***":
            data["storage"][key] = None
    try:
        spec = spec_from_dict(apply_overrides(data, set_), f"{run_dir}/_plan.json")
    except SpecError as exc:
        _err(str(exc))
        raise typer.Exit(2)
    parent, run_id = run_dir.rstrip("/").rsplit("/", 1)
    _run("", plan["input"], parent, "auto", run_id, [], address, evaluate, True, spec=spec, verbose=verbose, executor=executor)


@app.command("evaluate")
def evaluate_cmd(
    run: str = typer.Argument(..., help="A finished run folder: OUTPUT/RUN_ID (local or s3://)."),
    ground_truth: Optional[str] = typer.Option(None, "--ground-truth", help="Ground-truth dataset; default: the run's own input manifest."),
    layout: str = typer.Option("auto", "--layout", help=f"Layout of --ground-truth: {_LAYOUT_HELP}."),
    eval_size: str = typer.Option("stored", "--eval-size", help="stored (map size; masks resized nearest) or a long side N."),
    image_score: str = typer.Option("auto", "--image-score", help="method (the run's score), max_map, transductive (APRIL-GAN few-shot's score_transductive), mutual or rscin (mutual scoring's score_mutual, score_rscin) or auto (transductive for APRIL-GAN few-shot runs, else method)."),
    aupro_limit: float = typer.Option(0.3, "--aupro-limit", help="FPR limit of AUPRO."),
    pro_mode: str = typer.Option("mvtec", "--pro-mode", help="mvtec (exact) or fixed_grid_200 (APRIL-GAN/AnomalyCLIP variant)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local Ray."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's own output (warnings, core worker and Ray Data lines, the workers' lines) on the terminal; it is always in the evaluation's log, RUN/logs/."),
    executor: str = typer.Option("ray", "--executor", help="What reads the masks: ray (one task per part file on a local Ray or the cluster at --address) or local (this process, no Ray). Results are the same."),
    paper: Optional[str] = typer.Option(None, "--paper", help="Print the run's mean metrics beside the numbers published for this preset (winclip, aprilgan, vvv, fade, clip_sam, fade_fewshot, musc, musc_fast), with the difference (README \"Reproducing the published numbers\")."),
    dataset: str = typer.Option("auto", "--dataset", help="With --paper: mvtec or visa; auto: from the run's input layout."),
) -> None:
    """Evaluate a run against ground truth: writes RUN/metrics/ and RUN/metrics.md."""
    from pipeline.io.fs import storage_options

    _check_executor(executor, address)
    target = _paper_row(run, paper, dataset, storage_options()) if paper else None
    size: object = eval_size
    if eval_size != "stored":
        if not eval_size.isdigit() or int(eval_size) < 1:
            _err(f"--eval-size {eval_size!r}: use stored or a positive integer")
            raise typer.Exit(2)
        size = int(eval_size)
    from pipeline.io import fs as fsio

    with _captured(verbose, storage=storage_options()) as console:
        table = _evaluate(run, storage_options(), address, gt_uri=ground_truth, layout=None if layout == "auto" else layout,
                          eval_size=size, image_score=image_score, aupro_limit=aupro_limit, pro_mode=pro_mode,
                          executor=executor)
        console.keep_at = fsio.join(fsio.normalise(run), "logs", _attempt_log_name("evaluate"))
    if target is not None:
        from pipeline.metrics import papers

        records = table.to_dict("records")
        typer.echo("\n" + papers.text(papers.beside(records, target), target, bool(table["random_weights"].iloc[0])))


def _paper_row(run: str, paper: str, dataset: str, storage):
    """The published row ``--paper`` asks for (exit 2 before anything runs when there is none)."""
    from pipeline.io import fs as fsio
    from pipeline.io.sinks import read_json
    from pipeline.metrics import papers

    if dataset == "auto":
        try:
            layout = read_json(fsio.join(fsio.normalise(run), "run.json"), storage).get("layout")
        except Exception:  # noqa: BLE001 - the evaluation itself reports a missing run
            layout = None
        dataset = papers.DATASETS.get(str(layout), "")
        if not dataset:
            _err(f"--paper {paper}: the run's input layout is {layout!r}, not mvtec or visa; give --dataset mvtec|visa")
            raise typer.Exit(2)
    try:
        return papers.published(paper, dataset)
    except papers.PaperError as exc:
        _err(f"--paper: {exc}")
        raise typer.Exit(2)


@app.command("runs")
def runs_cmd(
    output: str = typer.Argument(..., help="An output root (local or s3://) holding runs."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per run instead of the table."),
) -> None:
    """List the runs under an output root: id, status, start, images ok/failed, preset, mean metrics."""
    from pipeline.io.fs import storage_options
    from pipeline.io.runs import list_runs

    try:
        table = list_runs(output, storage_options())
    except (FileNotFoundError, OSError) as exc:
        _err(str(exc))
        raise typer.Exit(2)
    if as_json:
        typer.echo(table.to_json(orient="records", lines=True))
    elif table.empty:
        typer.echo(f"no runs under {output}")
    else:
        typer.echo(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}"))
        if table["random_weights"].fillna(False).astype(bool).any():
            typer.echo("(runs with random_weights True used random model weights: their metrics are NOT results)")


def _check_layout(layout: str) -> None:
    """Exit 2 unless ``layout`` is ``auto`` or a registered dataset layout."""
    from pipeline.io.layouts import LAYOUTS

    if layout not in LAYOUTS:
        _err(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        raise typer.Exit(2)


def _model_problem(spec) -> Optional[str]:
    """The model name and pretrained tag, checked against open_clip's registry
    (:func:`pipeline.models.registry.check_model`), local weight files, which must exist (URIs are
    not fetched: they are checked when a run starts), and the settings that depend on the model's
    shape (:mod:`pipeline.runtime.preflight`), one per line."""
    from pipeline.io.weights import WeightsError, preflight
    from pipeline.models import registry

    tag = spec.clip.weights.tag if spec.clip.weights else None
    for key, checked_tag in (("clip.model", None), ("clip.weights", tag)):
        try:
            registry.check_model(spec.clip.model, checked_tag)
        except registry.ModelLoadError as exc:
            return f"{key}: {exc}"
    files = {"clip.weights": spec.clip.weights, "sam.weights": spec.sam.weights if getattr(spec, "sam", None) else None,
             "foreground.dis_model": spec.foreground.dis_model if getattr(spec, "foreground", None) else None,
             "pixel.weights": getattr(getattr(spec, "pixel", None), "weights", None),
             "adapters.weights": getattr(getattr(spec, "adapters", None), "weights", None)}
    for key, weights in files.items():
        if weights is not None and weights.path:
            try:
                preflight(weights)
            except WeightsError as exc:
                return f"{key}: {exc}"
    from pipeline.stages.clip_score import prompt_file_problem

    problem = prompt_file_problem(spec, objects=False)  # objects are checked when a run starts
    if problem:
        return problem
    from pipeline.runtime.preflight import model_problems  # settings against the model's shape

    return "\n  ".join(model_problems(spec)) or None


# Ray Jobs commands (submit, status, logs, stop) live in pipeline/cli_jobs.py; importing it registers
# them on `app`, here so that `zsad --help` lists them after `evaluate`.
import pipeline.cli_jobs  # noqa: E402,F401
import pipeline.cli_report  # noqa: E402,F401


@app.command()
def validate(
    jobs: List[str] = typer.Argument(..., help="Job spec files to check."),
    set_: List[str] = typer.Option([], "--set", help="Overrides applied to every file before checking."),
    tiny: bool = typer.Option(False, "--tiny", help="Check each file as --tiny runs it (the tiny random-weight models)."),
) -> None:
    """Check job specs without running them (unknown keys, types, the random-weights gate, model
    names and tags, local weight files exist, local prompt files parse)."""
    from pipeline.config import TrainSpec, is_training_spec

    failed = 0
    for path in jobs:
        try:
            training = is_training_spec(path)
            spec = load_spec(path, set_, model=TrainSpec if training else None, tiny=tiny)
        except SpecError as exc:
            failed += 1
            _err(str(exc))
            continue
        problem = _model_problem(spec)
        if problem:
            failed += 1
            _err(f"invalid job spec {path}:\n  {problem}")
            continue
        weights = spec.clip.weights.describe() if spec.clip.weights else "random (allowed)"
        what = (f"training: adapters on layers {list(spec.adapters.layers)}, {spec.train.epochs} epochs" if training
                else f"{spec.score.kind} + pixel {spec.pixel.kind}")
        typer.echo(f"ok  {path}  ({spec.name}: {what}, clip {spec.clip.model}, weights {weights})")
    if failed:
        raise typer.Exit(2)


@app.command()
def schema(table: Optional[str] = typer.Argument(None, help="Table name (scores, errors, inputs, masks, foreground, tiles, metrics); default: all.")) -> None:
    """Print the table contracts (columns, Arrow types, nullability, docs)."""
    from pipeline.io import contracts

    names = [table] if table else contracts.table_names()
    try:
        texts = [contracts.describe(contracts.load(n)) for n in names]
    except contracts.ContractError as exc:
        _err(str(exc))
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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's own output (warnings, core worker and Ray Data lines, the workers' lines) on the terminal; it is always in the run's log, RUN/logs/."),
) -> None:
    """Generate a small synthetic MVTec-style dataset and run the smoke job on it with a local Ray."""
    from pipeline.synthetic import make_dataset

    info = make_dataset(data)
    _log(f"generated synthetic dataset at {os.path.abspath(data)}: {info}")
    result = _run(job or preset_path("smoke"), data, output, "auto", None, set_, None, verbose=verbose)
    import pandas as pd

    scores = pd.read_parquet(os.path.join(result.run_dir, "scores"))
    ok = scores[scores["status"] == "ok"]
    by_cat = ok.groupby(["category", "gt_label"], dropna=False)["score"].agg(["count", "mean"]).reset_index()
    typer.echo("\nmean score per category and ground-truth label (random weights: NOT a result):")
    typer.echo(by_cat.to_string(index=False))
    typer.echo(f"\nload the tables with:  pandas.read_parquet('{result.run_dir}/scores')")
    if result.record.get("report"):
        typer.echo(f"open the report:      {result.record['report']}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
