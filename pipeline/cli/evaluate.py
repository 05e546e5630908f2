"""``zsad evaluate`` (a run against ground truth, optionally beside a paper's numbers) and ``zsad runs``
(the runs under an output root); exit codes: :mod:`pipeline.cli.core`."""

from __future__ import annotations

from typing import Optional

import typer

from pipeline.cli.core import LAYOUT_HELP, app, attempt_log_name, captured, check_executor, err, evaluate_and_show


@app.command("evaluate")
def evaluate_cmd(
    run: str = typer.Argument(..., help="A finished run folder: OUTPUT/RUN_ID (local or s3://)."),
    ground_truth: Optional[str] = typer.Option(None, "--ground-truth",
                                               help="Ground-truth dataset; default: the run's own input manifest."),
    layout: str = typer.Option("auto", "--layout", help=f"Layout of --ground-truth: {LAYOUT_HELP}."),
    eval_size: str = typer.Option("stored", "--eval-size",
                                  help="stored (map size; masks resized nearest) or a long side N."),
    image_score: str = typer.Option(
        "auto", "--image-score", help="method (the run's score), max_map, transductive (APRIL-GAN few-shot's "
                                      "score_transductive), mutual or rscin (mutual scoring's score_mutual, "
                                      "score_rscin) or auto (transductive for APRIL-GAN few-shot runs, else method)."),
    aupro_limit: float = typer.Option(0.3, "--aupro-limit", help="FPR limit of AUPRO."),
    pro_mode: str = typer.Option("mvtec", "--pro-mode",
                                 help="mvtec (exact) or fixed_grid_200 (APRIL-GAN/AnomalyCLIP variant)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local Ray."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show Ray's own output (warnings, core worker and Ray Data lines, the "
                                       "workers' lines) on the terminal; it is always in the evaluation's log, "
                                       "RUN/logs/."),
    executor: str = typer.Option(
        "ray", "--executor", help="What reads the masks: ray (one task per part file on a local Ray or the cluster at "
                                  "--address) or local (this process, no Ray). Results are the same."),
    paper: Optional[str] = typer.Option(
        None, "--paper", help="Print the run's mean metrics beside the numbers published for this preset (winclip, "
                              "aprilgan, vvv, fade, clip_sam, fade_fewshot, musc, musc_fast), with the difference "
                              "(README \"Reproducing the published numbers\")."),
    dataset: str = typer.Option("auto", "--dataset", help="With --paper: mvtec or visa; auto: from the run's input "
                                                          "layout."),
) -> None:
    """Evaluate a run against ground truth: writes RUN/metrics/ and RUN/metrics.md."""
    from pipeline.io.fs import storage_options

    check_executor(executor, address)
    target = _paper_row(run, paper, dataset, storage_options()) if paper else None
    size: object = eval_size
    if eval_size != "stored":
        if not eval_size.isdigit() or int(eval_size) < 1:
            err(f"--eval-size {eval_size!r}: use stored or a positive integer")
            raise typer.Exit(2)
        size = int(eval_size)
    from pipeline.io import fs as fsio

    with captured(verbose, storage=storage_options()) as console:
        table = evaluate_and_show(run, storage_options(), address, gt_uri=ground_truth,
                                  layout=None if layout == "auto" else layout, eval_size=size,
                                  image_score=image_score, aupro_limit=aupro_limit, pro_mode=pro_mode,
                                  executor=executor)
        console.keep_at = fsio.join(fsio.normalise(run), "logs", attempt_log_name("evaluate"))
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
            err(f"--paper {paper}: the run's input layout is {layout!r}, not mvtec or visa; give --dataset mvtec|visa")
            raise typer.Exit(2)
    try:
        return papers.published(paper, dataset)
    except papers.PaperError as exc:
        err(f"--paper: {exc}")
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
        err(str(exc))
        raise typer.Exit(2)
    if as_json:
        typer.echo(table.to_json(orient="records", lines=True))
    elif table.empty:
        typer.echo(f"no runs under {output}")
    else:
        typer.echo(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}"))
        if table["random_weights"].fillna(False).astype(bool).any():
            typer.echo("(runs with random_weights True used random model weights: their metrics are NOT results)")
