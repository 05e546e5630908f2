"""CLI commands that need no Ray: validate, schema, and the run command's refusal paths (exit 2)."""

import ast
import glob
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def test_validate_all_presets():
    res = runner.invoke(app, ["validate", *sorted(glob.glob(str(REPO / "jobs" / "*.yaml")))])
    assert res.exit_code == 0, res.output
    assert res.output.count("ok  ") == len(glob.glob(str(REPO / "jobs" / "*.yaml")))


def test_validate_reports_misspelled_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip: {model: zsad-tiny, weigths: null}\n")
    res = runner.invoke(app, ["validate", str(REPO / "jobs" / "smoke.yaml"), str(bad)])
    assert res.exit_code == 2
    assert str(bad) in res.output and "clip.weigths: unknown key" in res.output
    assert "ok  " in res.output  # the good file is still reported


def test_validate_checks_model_and_tag():
    res = runner.invoke(app, ["validate", str(REPO / "jobs" / "winclip.yaml"), "--set", "clip.weights=laion2b_nope"])
    assert res.exit_code == 2 and "no pretrained tag 'laion2b_nope'" in res.output
    res = runner.invoke(app, ["validate", str(REPO / "jobs" / "smoke.yaml"), "--set", "clip.model=ViT-Q-99"])
    assert res.exit_code == 2 and "unknown open_clip model 'ViT-Q-99'" in res.output


def test_schema_command():
    res = runner.invoke(app, ["schema", "scores"])
    assert res.exit_code == 0 and "random_weights" in res.output and "schema version 5" in res.output
    res = runner.invoke(app, ["schema"])
    assert all(t in res.output for t in ("scores", "errors", "inputs", "masks", "embeddings"))
    res = runner.invoke(app, ["schema", "nope"])
    assert res.exit_code == 2 and "no contract for table 'nope'" in res.output


def _run(*args):
    return runner.invoke(app, ["run", str(REPO / "jobs" / "smoke.yaml"), *args])


def test_run_refuses_empty_missing_input_and_bad_spec(tmp_path):
    (tmp_path / "empty").mkdir()
    res = _run("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out"))
    assert res.exit_code == 2 and "no images" in res.output.lower() and str(tmp_path / "empty") in res.output
    res = _run("--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert res.exit_code == 2 and str(tmp_path / "nowhere") in res.output
    res = _run("--input", str(tmp_path), "--output", str(tmp_path / "out"), "--set", "clip.weights=null", "--set",
               "allow_random_weights=false")
    assert res.exit_code == 2 and "allow_random_weights" in res.output
    res = _run("--input", str(tmp_path), "--output", str(tmp_path / "out"), "--layout", "zip")
    assert res.exit_code == 2 and "--layout 'zip'" in res.output
    res = _run("--input", str(tmp_path), "--output", str(tmp_path / "out"), "--run-id", "../evil")
    assert res.exit_code == 2 and "run id" in res.output
    res = _run("--input", str(tmp_path), "--output", str(tmp_path / "out"), "--set", f"clip.weights={tmp_path}/none.pt")
    assert res.exit_code == 2 and "none.pt does not exist" in res.output
    assert not (tmp_path / "out").exists()  # nothing was written for a refused run


def test_only_runtime_imports_ray():
    offenders = []
    for path in (REPO / "pipeline").rglob("*.py"):
        if "runtime" in path.relative_to(REPO / "pipeline").parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(str(path))
    assert not offenders, f"only pipeline/runtime/ may import ray: {offenders}"


def test_run_refuses_unwritable_output(tmp_path):
    from tests.helpers.badfiles import write_good_images

    write_good_images(tmp_path / "in" / "cat", 1)
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    res = _run("--input", str(tmp_path / "in"), "--output", str(tmp_path / "blocker"))
    assert res.exit_code == 2 and "cannot be written" in res.output and str(tmp_path / "blocker") in res.output


def test_help_spells_out_every_layout():
    """Issue 11 (CLI): `--help` showed `auto|folder|mvtec|manif…` and `evaluate --layout` 4 of 8 layouts."""
    from pipeline.io.layouts import LAYOUTS

    for command in ("run", "evaluate"):
        res = runner.invoke(app, [command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        text = " ".join(res.output.replace("│", " ").split())
        assert res.exit_code == 0 and "…" not in text, text
        for name in LAYOUTS:
            assert f" {name}," in text or f" {name}." in text or f" {name} (" in text, (command, name)


def test_categories_and_max_images_pick_the_inputs(tmp_path):
    """Issue 11 (CLI): --categories a,b and --max-images N (also data.categories / data.max_images)."""
    from pipeline.config import DataSpec
    from pipeline.io.layouts import InputError, list_inputs
    from pipeline.synthetic import make_dataset

    make_dataset(str(tmp_path / "d"), categories=("bottle", "cable", "grid"), n_good=1, n_bad=1, size=32)
    _, df = list_inputs(str(tmp_path / "d"), DataSpec(categories=("cable", "grid"), max_images=3))
    assert len(df) == 3 and set(df["category"]) <= {"cable", "grid"} and df["uri"].is_monotonic_increasing
    import pytest

    with pytest.raises(InputError, match="category 'zipper' not found; available: bottle, cable, grid"):
        list_inputs(str(tmp_path / "d"), DataSpec(categories=("zipper",)))
    res = runner.invoke(app, ["run", "jobs/smoke.yaml", "--input", str(tmp_path / "d"), "--output", str(tmp_path / "o"),
                              "--categories", "zipper"])
    assert res.exit_code == 2 and "category 'zipper' not found" in res.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    """Issue 11 (CLI): --dry-run lists, checks and prints the plan; nothing is scored or written."""
    import json

    from pipeline.synthetic import make_dataset

    make_dataset(str(tmp_path / "d"), categories=("bottle", "cable"), n_good=1, n_bad=2, size=32)
    res = runner.invoke(app, ["run", "jobs/vvv.yaml", "--input", str(tmp_path / "d"), "--output", str(tmp_path / "o"),
                              "--dry-run", "--set", "clip.model=zsad-tiny", "--set", "clip.weights=null",
                              "--set", "allow_random_weights=true", "--set", "foreground.kind=classical"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["images"] == 6 and plan["images_by_category"] == {"bottle": 3, "cable": 3}
    assert plan["labelled_images"] == 6
    assert [(s["stage"], s["kind"]) for s in plan["plan"]] == [
        ("decode", "task"), ("foreground", "task"), ("tiling", "task"), ("clip_score", "actor"), ("aggregate", "task"),
        ("encode", "task")]
    assert plan["plan"][3]["num_gpus"] == 0.5 and plan["tables"] == ["scores", "errors", "masks", "foreground", "tiles"]
    assert not (tmp_path / "o").exists()


def test_runs_lists_the_runs_under_an_output(tmp_path):
    """Issue 11 (CLI): `zsad runs OUTPUT` lists run id, status, start, counts, preset and mean metrics."""
    import json

    import pandas as pd

    out = tmp_path / "out"
    (out / "a" / "metrics").mkdir(parents=True)
    (out / "a" / "run.json").write_text(json.dumps({
        "run_id": "a", "status": "succeeded", "started": "2026-12-01T10:00:00+00:00", "random_weights": True,
        "counts": {"images": 10, "ok": 9, "failed": 1, "missing": 0}, "spec": {"name": "smoke"}}))
    pd.DataFrame({"category": ["x", "mean"], "image_auroc": [0.5, 0.625], "pixel_auroc": [0.7, 0.75],
                  "pixel_aupro": [None, None]}).to_parquet(out / "a" / "metrics" / "part-00000.parquet")
    (out / "b").mkdir()
    (out / "b" / "_plan.json").write_text(json.dumps({"run_id": "b", "images": 4, "spec": {"name": "vvv"}}))
    (out / "not-a-run").mkdir()
    res = runner.invoke(app, ["runs", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [(r["run_id"], r["status"], r["preset"]) for r in rows] == [("a", "succeeded", "smoke"),
                                                                       ("b", "unfinished", "vvv")]
    assert (rows[0]["ok"], rows[0]["failed"], rows[0]["image_auroc"], rows[0]["pixel_auroc"]) == (9, 1, 0.625, 0.75)
    table = runner.invoke(app, ["runs", str(out)])
    assert table.exit_code == 0 and "succeeded" in table.stdout and "NOT results" in table.stdout
    assert runner.invoke(app, ["runs", str(tmp_path / "missing")]).exit_code == 2


def test_executor_option_refusals_exit_2_before_anything_starts(tmp_path):
    (tmp_path / "in").mkdir()
    res = _run("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--executor", "dask")
    assert res.exit_code == 2 and "executor 'dask': use ray or local" in res.output
    res = _run("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--executor", "local",
               "--address", "auto")
    assert res.exit_code == 2 and "--address auto needs the ray executor" in res.output
    res = _run("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--set", "runtime.executor=local",
               "--address", "auto")
    assert res.exit_code == 2 and "runtime.executor is local" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "out"), "--executor", "spark"])
    assert res.exit_code == 2 and "executor 'spark'" in res.output
    res = runner.invoke(app, ["submit", str(REPO / "jobs" / "smoke.yaml"), "--input", "s3://b/in", "--output", "s3://b/out",
                              "--set", "runtime.executor=local", "--address", "http://127.0.0.1:1"])
    assert res.exit_code == 2 and "runtime.executor is local" in res.output
    assert not (tmp_path / "out").exists()


def test_validate_with_tiny_checks_every_preset_on_the_tiny_models():
    paths = sorted(glob.glob(str(REPO / "jobs" / "*.yaml")))
    res = runner.invoke(app, ["validate", "--tiny", *paths])
    assert res.exit_code == 0, res.output
    assert res.output.count("ok  ") == len(paths)
    assert res.output.count("clip zsad-tiny, weights random (allowed)") == len(paths)


def test_command_modules_import_only_the_app_module_of_the_cli():
    """Issue 30: pipeline/cli/ is the app and what its commands share (core.py) and command modules by
    topic; a command module imports from core.py and the rest of pipeline, never another command
    module (lazy imports too)."""
    import pipeline.cli

    folder = REPO / "pipeline" / "cli"
    commands = {p.stem for p in folder.glob("*.py")} - {"__init__", "__main__", "core"}
    assert {"run", "train", "evaluate", "jobs", "report"} <= commands
    for path in folder.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
                if isinstance(node, ast.ImportFrom) else [])
            cli = [n for n in names if n == "pipeline.cli" or n.startswith("pipeline.cli.")]
            assert all(n.startswith("pipeline.cli.core") for n in cli), (path.name, cli)
    assert pipeline.cli.core is pipeline.cli.core  # the package exposes the typer app and main
    assert callable(pipeline.cli.main)
