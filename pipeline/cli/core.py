"""The ``zsad`` typer app and what its commands share: the console and its lines (:func:`err`,
:func:`log`, :func:`captured`), the options that several commands take (defined once here), spec
loading with exit 2, the run summary, the evaluation table and the report after a run.

The commands live in the modules beside this one (run, train, evaluate, jobs, report), each
importing only from here and the rest of :mod:`pipeline`; :mod:`pipeline.cli` imports them, which
registers them on :data:`app`.

Exit codes: 0 success; 1 the run completed but failed (error budget exceeded, a stage failed);
2 bad usage or input (invalid spec, empty or unreachable input, output not writable).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated, Iterator, List, Optional, get_args

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
EXECUTOR_HELP = ("What runs the plan: ray (a local Ray for this command, or the cluster at --address) or local (this "
                 "process, no Ray: a quick look at a few images, debugging, tests); default: the spec's "
                 "runtime.executor (ray). Results are the same.")
TINY_HELP = ("Run the spec on the tiny random-weight models (CLIP zsad-tiny, tiny SAM, random adapters, small layers, "
             "image and map sizes, no GPU requests): try any preset in seconds without its weights. The outputs say "
             "random weights; --set overrides still apply after it.")
VERBOSE_HELP = ("Also show Ray's own output (warnings, core worker and Ray Data lines, the workers' lines) on the "
                "terminal; it is always in the run's log, RUN/logs/.")

#: every layout name, spelled out for --help (rich would cut one long "a|b|c" word)
LAYOUT_HELP = "auto (detect), " + ", ".join(n for n in get_args(DataSpec.model_fields["layout"].annotation)
                                            if n != "auto")

# The options zsad run and zsad submit share (train takes some of them too), written once.
SetOption = Annotated[List[str], typer.Option("--set", help="Override a spec key: dotted.key=value (repeatable).")]
LayoutOption = Annotated[str, typer.Option("--layout", help=f"Input layout: {LAYOUT_HELP}.")]
TinyOption = Annotated[bool, typer.Option("--tiny", help=TINY_HELP)]
EvaluateOption = Annotated[bool, typer.Option("--evaluate/--no-evaluate",
                                              help="Evaluate when the input layout carries labels.")]
InputOption = Annotated[str, typer.Option(
    "--input", "-i", help="Input: a local folder or file, or an s3:// URI (bucket and prefix); for zsad submit, as the "
                          "CLUSTER sees it (local paths must exist on the cluster's nodes).")]
OutputOption = Annotated[str, typer.Option(
    "--output", "-o", help="Output root: a local folder or an s3:// URI (bucket and prefix); for zsad submit, as the "
                           "cluster sees it (s3://... on a real cluster).")]
RunIdOption = Annotated[Optional[str], typer.Option(
    "--run-id", help="Run id (folder under OUTPUT; for zsad submit also the Ray submission id); default: UTC time + "
                     "random suffix.")]
ResumeOption = Annotated[bool, typer.Option(
    "--resume", help="Continue the interrupted run --run-id: rerun only shards without a done marker (zsad submit: "
                     "as a new attempt of a stopped or failed run).")]
ReferenceOption = Annotated[Optional[str], typer.Option(
    "--reference", help="Few-shot reference images (normal, per category; for zsad submit as the CLUSTER sees them): "
                        "a folder per category, a dataset root (its train split: mvtec, visa, mpdd, btad) or a "
                        "manifest; the spec's few_shot.reference (turns few-shot on with its defaults when the spec "
                        "has no few_shot section).")]


def spec_sets(sets: List[str], reference: Optional[str] = None, skip_scored: Optional[str] = None) -> List[str]:
    """The ``--set`` overrides with those that ``--skip-scored`` and ``--reference`` stand for."""
    if skip_scored:
        sets = [*sets, f"skip_scored={skip_scored}"]
    if reference:
        sets = [*sets, f"few_shot.reference={reference}"]
    return sets


def load_or_exit(path: str, sets: List[str], model=None, tiny: bool = False):
    """:func:`pipeline.config.load_spec`; a spec that cannot be used is said and exits 2."""
    try:
        return load_spec(path, sets, model=model, tiny=tiny)
    except SpecError as exc:
        err(str(exc))
        raise typer.Exit(2)


def needs_run_id(resume: bool, run_id: Optional[str], what: str = "the run to continue") -> None:
    """Exit 2 for --resume without --run-id."""
    if resume and not run_id:
        err(f"--resume needs --run-id ({what})")
        raise typer.Exit(2)


#: where zsad's lines go; a command that starts Ray swaps in its own (see captured)
_CONSOLE = None


def console():
    from pipeline.runtime.console import Console

    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = Console()
    return _CONSOLE


@contextlib.contextmanager
def captured(verbose: bool, quiet: bool = False, storage=None) -> Iterator:
    """For the block: Ray's own output (warnings, core worker lines, Ray Data's INFO lines, the
    workers' lines) goes to a log file instead of the terminal, unless ``verbose``
    (:mod:`pipeline.runtime.console`). Yields the console; set its ``keep_at`` to the URI the log
    is copied to when the block ends (the last line says where it is, or where it stayed when the
    copy failed). Without one (the run was refused) the log is removed unless Ray wrote to it
    (then its place is said)."""
    from pipeline.runtime.console import Console

    global _CONSOLE
    previous, _CONSOLE = _CONSOLE, Console(verbose=verbose, quiet=quiet)
    current = _CONSOLE
    try:
        with current.captured():
            yield current
    finally:
        _CONSOLE = previous
        if current.keep_at:
            # said after the copy, so that a log that could not be copied is never named as kept
            note = current.keep(current.keep_at, storage)
            if not note:
                typer.echo(f"  log (Ray's own output too): {current.keep_at}")
        else:
            note = current.discard()
        if note:
            err(note)


def err(message: str) -> None:
    console().error(message)


def log(message: str) -> None:
    console().say(message)


def attempt_log_name(kind: str) -> str:
    """``RUN/logs/<kind>-<UTC time>.log``: one log per attempt (run, resume, evaluate)."""
    import datetime as dt

    return f"{kind}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.log"


def summary(result) -> str:
    """The lines ``zsad run`` ends with: status, counts, time, the tables written, the record."""
    m = result.record
    written = [t for t, files in m.get("tables", {}).items() if t not in ("scores", "errors", "inputs") and files]
    lines = [
        f"run {result.run_id}: {result.status}",
        f"  images: {result.n_images}  ok: {result.n_ok}  failed: {result.n_failed} ({100 * result.error_rate:.1f}%)",
        f"  wall time: {m.get('wall_seconds', 0):.1f} s",
        f"  tables:  {result.run_dir}/scores/  {result.run_dir}/errors/  {result.run_dir}/inputs.parquet"
        + "".join(f"  {result.run_dir}/{t}/" for t in written),
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


def check_executor(executor: str, address: Optional[str]) -> None:
    """Exit 2 unless ``executor`` is ray or local, and local comes without --address."""
    from pipeline.runtime.executors import ExecutorError, check

    try:
        check(executor, address)
    except ExecutorError as exc:
        err(str(exc))
        raise typer.Exit(2)


def check_layout(layout: str) -> None:
    """Exit 2 unless ``layout`` is ``auto`` or a registered dataset layout
    (:func:`pipeline.runtime.preflight.layout_problem`)."""
    from pipeline.runtime.preflight import layout_problem

    problem = layout_problem(layout)
    if problem:
        err(problem)
        raise typer.Exit(2)


def check_spec(spec, path: str) -> None:
    """Exit 2 when ``spec`` cannot run (:func:`pipeline.runtime.preflight.spec_problem`)."""
    from pipeline.runtime.preflight import spec_problem

    problem = spec_problem(spec)
    if problem:
        err(f"invalid job spec {path}:\n  {problem}")
        raise typer.Exit(2)


def evaluate_and_show(run_dir: str, storage, address: Optional[str], executor: str = "ray", **kwargs):
    """Evaluate a run (:func:`pipeline.runtime.evaluate.evaluate_run`, exit 2 when it cannot) and
    print its metrics table."""
    from pipeline.runtime.evaluate import EvaluationError, evaluate_run

    try:
        table = evaluate_run(run_dir, storage=storage, address=address, log=log, executor=executor, **kwargs)
    except EvaluationError as exc:
        err(str(exc))
        raise typer.Exit(2)
    shown = table[["category", "n_images", "image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "pixel_aupro"]]
    typer.echo(f"\nmetrics: {run_dir}/metrics/  {run_dir}/metrics.md")
    if bool(table["random_weights"].iloc[0]):
        typer.echo("  (random model weights: these numbers are NOT anomaly-detection results)")
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


def report_after_run(run_dir: str, spec, storage) -> Optional[str]:
    """The report at the end of ``zsad run`` (spec ``report``); a report that cannot be written is
    said, with the command that writes it later, and never fails the run."""
    if not spec.report.enabled:
        return None
    from pipeline.report.report import build_report

    try:
        return build_report(run_dir, top=spec.report.top, map_range=spec.report.map_range, storage=storage,
                            log=typer.echo).path
    except Exception as exc:  # noqa: BLE001 - the run's tables are written; the page can be made again
        err(f"report: not written ({type(exc).__name__}: {exc}); write it with: zsad report {run_dir}")
        return None


def main() -> None:
    """The ``zsad`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)
