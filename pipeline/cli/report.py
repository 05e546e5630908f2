"""The result-viewing commands of ``zsad``: report, export-maps and compare (registered on
:data:`pipeline.cli.core.app` when ``pipeline.cli`` imports this module). The work happens in
:mod:`pipeline.report`; exit codes are those of :mod:`pipeline.cli.core` (2: a run folder or an option
that cannot be used). The report written at the end of ``zsad run`` is :func:`pipeline.cli.core.report_after_run`."""

from __future__ import annotations

from typing import Optional

import typer

from pipeline.cli.core import app, err

_RANGE_HELP = ("Heatmap colour scale, the same for every image: auto (0.5th-99.9th percentile of the shown maps), "
               "stored (the maps' stored range) or LO,HI.")


def _report_call(fn, *args, **kwargs):
    from pipeline.io.fs import StorageError
    from pipeline.report.runread import ReportError

    try:
        return fn(*args, **kwargs)
    except ReportError as exc:
        err(str(exc))
        raise typer.Exit(2)
    except (StorageError, OSError) as exc:
        err(f"{type(exc).__name__}: {exc}")
        raise typer.Exit(2)


@app.command("report")
def report_cmd(
    run: str = typer.Argument(..., help="A finished run folder: OUTPUT/RUN_ID (local or s3://)."),
    out: Optional[str] = typer.Option(None, "--out",
                                      help="The HTML file to write (local or s3://); default RUN/report.html."),
    top: int = typer.Option(6, "--top", min=1, max=200,
                            help="Images per category: the N most anomalous, and N more nearest the threshold."),
    map_range: str = typer.Option("auto", "--map-range", help=_RANGE_HELP),
) -> None:
    """Write the run's self-contained HTML report: run summary, errors, metrics, curves, histograms,
    the most anomalous images with heatmap overlays, failed inputs."""
    from pipeline.io.fs import storage_options
    from pipeline.report.report import build_report

    _report_call(build_report, run, out, top=top, map_range=map_range, storage=storage_options(), log=typer.echo)


@app.command("export-maps")
def export_maps_cmd(
    run: str = typer.Argument(..., help="A finished run folder with heatmaps: OUTPUT/RUN_ID (local or s3://)."),
    out: str = typer.Option(..., "--out", help="Folder to write into (local or s3://)."),
    fmt: str = typer.Option("png16", "--format", help="png16 (the stored 16-bit PNG, exact), png8 (256 grey levels) "
                                                      "or npy (float32 values)."),
    overlay: bool = typer.Option(False, "--overlay",
                                 help="Also write each image with its heatmap blended in, at the image's size."),
    map_range: str = typer.Option("stored", "--map-range", help="Colour scale of the overlays: stored (the maps' "
                                                                "stored range) or LO,HI (e.g. a report's colour bar)."),
) -> None:
    """Write the run's heatmaps (and masks) as ordinary files named after the images' paths, plus index.csv."""
    from pipeline.io.fs import storage_options
    from pipeline.report.export import export_maps

    result = _report_call(export_maps, run, out, fmt=fmt, overlay=overlay, map_range=map_range,
                          storage=storage_options(), log=typer.echo)
    for problem in result.problems[:20]:
        err(problem)
    if result.problems:
        raise typer.Exit(1)


@app.command("compare")
def compare_cmd(
    run_a: str = typer.Argument(..., help="Run A: OUTPUT/RUN_ID (local or s3://)."),
    run_b: str = typer.Argument(..., help="Run B, over the same images."),
    out: Optional[str] = typer.Option(None, "--out", help="The HTML file to write (local or s3://); default "
                                                          "./compare-A-vs-B.html."),
    top: int = typer.Option(8, "--top", min=1, max=200, help="Images shown whose rank changed most."),
) -> None:
    """Compare two runs over the same images: metrics side by side with deltas, score scatter, the
    images whose rank changed most with both heatmaps."""
    from pipeline.io.fs import storage_options
    from pipeline.report.compare import build_compare

    _report_call(build_compare, run_a, run_b, out, top=top, storage=storage_options(), log=typer.echo)
