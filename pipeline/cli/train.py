"""``zsad train``: APRIL-GAN adapters trained with Ray Train (exit codes: :mod:`pipeline.cli.core`)."""

from __future__ import annotations

from typing import Optional

import typer

from pipeline.cli.core import (
    LayoutOption,
    SetOption,
    TinyOption,
    app,
    attempt_log_name,
    captured,
    check_layout,
    err,
    load_or_exit,
    log,
    needs_run_id,
)


@app.command("train")
def train_cmd(
    job: str = typer.Argument(..., help="Training spec YAML (e.g. jobs/train_aprilgan.yaml)."),
    input: str = typer.Option(..., "--input", "-i", help="Labelled input with masks (mvtec, visa, or a manifest with "
                                                         "mask_uri): a local folder or s3:// URI."),
    output: str = typer.Option(..., "--output", "-o", help="Output root: checkpoints, the final adapters and "
                                                           "train.json go under OUTPUT/TRAIN_ID/."),
    layout: LayoutOption = "auto",
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Training id (folder under OUTPUT); default: UTC "
                                                                "time + random suffix."),
    set_: SetOption = [],
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address; default: a local Ray."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted training --run-id after its last "
                                                        "finished epoch."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Ray's own output on the terminal; it is "
                                                                "always in OUTPUT/TRAIN_ID/logs/."),
    tiny: TinyOption = False,
) -> None:
    """Train APRIL-GAN adapters on a frozen CLIP with Ray Train; prints the adapters' path and sha256."""
    from pipeline.config import TrainSpec
    from pipeline.io import fs as fsio
    from pipeline.runtime.ids import new_run_id
    from pipeline.runtime.train import PLAN, TrainError, train_job

    check_layout(layout)
    needs_run_id(resume, run_id, "the training to continue")
    if layout != "auto":
        set_ = [*set_, f"data.layout={layout}"]
    spec = load_or_exit(job, set_, model=TrainSpec, tiny=tiny)
    run_id = run_id or new_run_id()
    train_dir = fsio.join(fsio.normalise(output), run_id)
    storage = fsio.storage_options(spec.storage)
    with captured(verbose, storage=storage) as console:
        try:
            result = train_job(spec, input, output, run_id=run_id, resume=resume, address=address, log=log)
        except TrainError as exc:
            err(str(exc))
            try:  # a training that had started keeps its log in its folder
                if fsio.exists(fsio.join(train_dir, PLAN), storage):
                    console.keep_at = fsio.join(train_dir, "logs", attempt_log_name("train"))
            except Exception:  # noqa: BLE001 - the storage may be what failed; the local log is named then
                pass
            raise typer.Exit(exc.exit_code)
        if not result.already:  # a resume that found the training finished writes nothing, not even a log
            console.keep_at = fsio.join(train_dir, "logs", attempt_log_name("train"))
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
