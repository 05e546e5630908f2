"""What a new user hit (issue 27), from the CLI as a user runs it (subprocesses, the default Ray
executor): a preset on the tiny model with the preset's ViT-L layers is refused before Ray starts;
``zsad train`` on a local Ray without a GPU trains on the CPU or is refused at once, never waits;
resuming a run that already succeeded exits 0 and writes nothing.

"Before Ray starts" is checked on the file system: each command gets its own ``RAY_TMPDIR``, where
any Ray it started would have made its session folder."""

import json
import time
from pathlib import Path

import pytest

from pipeline.synthetic import make_dataset
from tests.helpers.zsad import TINY
from tests.helpers.zsad import zsad as _zsad

pytestmark = pytest.mark.integration
TINY_CLIP = ["--set", "clip.model=zsad-tiny", "--set", "clip.weights=null", "--set", "allow_random_weights=true"]


def _no_ray(tmp_path: Path, name: str) -> dict[str, str]:
    folder = tmp_path / f"ray-{name}"
    folder.mkdir()
    return {"RAY_TMPDIR": str(folder)}


def _ray_started(env: dict[str, str]) -> bool:
    return any(Path(env["RAY_TMPDIR"]).iterdir())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    make_dataset(str(root / "in"), categories=("widget",), n_good=2, n_bad=3, size=64)
    return root / "in"


# pixel.weights=null: the presets' adapters are a URI this machine cannot reach (checked after the shapes anyway)
PRESETS = [("musc", []), ("musc_fast", []), ("aprilgan", ["--set", "pixel.weights=null"]),
           ("aprilgan_fewshot", ["--set", "pixel.weights=null"]),
           ("clip_sam", ["--set", "pixel.weights=null", "--set", "sam.model=tiny", "--set", "sam.weights=null"])]


@pytest.mark.parametrize("preset,sets", PRESETS, ids=[p for p, _ in PRESETS])
def test_a_preset_on_the_tiny_model_with_its_own_layers_is_refused_before_ray_starts(tmp_path, data, preset, sets):
    """The run, its --dry-run and validate: exit 2 naming the key, the value and what the model
    allows; no Ray started, nothing written, no resume advice."""
    blocks = "[3, 6, 9, 12]" if preset == "musc_fast" else "[6, 12, 18, 24]"
    args = [f"jobs/{preset}.yaml", *TINY_CLIP, *sets]
    env = _no_ray(tmp_path, "run")
    t0 = time.monotonic()
    run = _zsad("run", *args, "--input", str(data), "--output", str(tmp_path / "out"), env=env, ray=True)
    assert run.returncode == 2, run.stderr[-3000:]
    assert (
        f"pixel.layers {blocks} exceed the 8 blocks of zsad-tiny (block numbers 1..8; e.g. [2, 4, 6, 8])" in run.stderr
    )
    if preset != "musc_fast":
        assert (
            "pixel.image_size 518 is not a multiple of zsad-tiny's patch size 16" in run.stderr
            and "512 or 528" in run.stderr
        )
    assert "nothing was started" in run.stderr and "resume" not in run.stderr + run.stdout
    assert "Traceback" not in run.stderr and "starting a local Ray" not in run.stderr
    assert not _ray_started(env) and not (tmp_path / "out").exists()
    assert time.monotonic() - t0 < 60
    if preset in ("musc", "aprilgan"):  # the same check, from the other commands (each subprocess costs seconds)
        dry = _zsad(
            "run", *args, "--input", str(data), "--output", str(tmp_path / "out"), "--dry-run", env=env, ray=True
        )
        assert dry.returncode == 2 and f"pixel.layers {blocks} exceed" in dry.stderr and dry.stdout == ""
        val = _zsad("validate", *args, env=env, here=False)
        assert val.returncode == 2 and f"pixel.layers {blocks} exceed the 8 blocks of zsad-tiny" in val.stderr
        assert not _ray_started(env)


def test_the_training_preset_on_the_tiny_model_with_its_own_layers_is_refused_before_ray_starts(tmp_path, data):
    env = _no_ray(tmp_path, "train")
    res = _zsad(
        "train",
        "jobs/train_aprilgan.yaml",
        *TINY_CLIP,
        "--input",
        str(data),
        "--output",
        str(tmp_path / "t"),
        env=env,
        here=False,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "adapters.layers [6, 12, 18, 24] exceed the 8 blocks of zsad-tiny" in res.stderr
    assert "adapters.image_size 518 is not a multiple of zsad-tiny's patch size 16" in res.stderr
    assert not _ray_started(env) and not (tmp_path / "t").exists() and "Traceback" not in res.stderr


def test_the_training_preset_on_a_local_ray_without_gpu_trains_on_the_cpu_or_is_refused_at_once(tmp_path, data):
    """The preset as shipped (use_gpu auto, {CPU: 4, GPU: 1}) on the tiny model, on a machine without
    a GPU: it trains on the CPU (and says so) where the machine has CPUs for it, else it is refused
    before Ray starts; use_gpu true without a GPU: refused before Ray starts. Never a wait. (The
    CPU training itself runs in test_train.py's S3 test on any machine.)"""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the preset would train on it")
    layers = ["--set", "adapters.layers=[2,4,6,8]", "--set", "adapters.image_size=128", "--set", "train.epochs=1"]
    out = tmp_path / "t"
    env = _no_ray(tmp_path, "train")
    t0 = time.monotonic()
    res = _zsad(
        "train",
        "jobs/train_aprilgan.yaml",
        *TINY_CLIP,
        *layers,
        "--input",
        str(data),
        "--output",
        str(out),
        "--run-id",
        "preset",
        env=env,
        timeout=240,
    )
    assert (
        "train.use_gpu is auto and this machine's Ray has no GPU: training on the CPU (1 worker(s) x {CPU: 4})"
        in res.stderr
    ), res.stderr[-3000:]
    assert time.monotonic() - t0 < 60, "a training of one tiny epoch, or a refusal: never a wait"
    if res.returncode == 2:  # fewer than 5 CPUs: 4 per worker and 1 for the decode tasks cannot fit
        assert not _ray_started(env)
        assert "need 4 CPU" in res.stderr or "resources.decode.num_cpus" in res.stderr, res.stderr[-2000:]
        assert "train.resources_per_worker" in res.stderr and not (out / "preset").exists()
    else:
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads((out / "preset" / "train.json").read_text())["status"] == "succeeded"
    t0 = time.monotonic()
    env = _no_ray(tmp_path, "gpu")
    gpu = _zsad(
        "train",
        "jobs/train_aprilgan.yaml",
        *TINY,
        "--set",
        "train.use_gpu=true",
        "--set",
        "train.resources_per_worker={CPU: 1, GPU: 1}",
        "--input",
        str(data),
        "--output",
        str(out),
        "--run-id",
        "gpu",
        env=env,
        timeout=120,
    )
    assert gpu.returncode == 2 and time.monotonic() - t0 < 60, gpu.stderr[-3000:]
    assert (
        "train.use_gpu is true and train.resources_per_worker asks for {CPU: 1, GPU: 1} per worker, but this "
        "machine's Ray has no GPU" in gpu.stderr
    )
    assert "set train.use_gpu: auto" in gpu.stderr and "Traceback" not in gpu.stderr
    assert not _ray_started(env) and not (out / "gpu").exists()  # refused: nothing to resume


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_resuming_a_run_that_already_succeeded_exits_0_and_writes_nothing(tmp_path, data):
    run = _zsad("run", "jobs/smoke.yaml", "--input", str(data), "--output", str(tmp_path / "out"), "--run-id", "done")
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "out" / "done"
    record = json.loads((folder / "run.json").read_text())
    before = _tree(folder)
    env = _no_ray(tmp_path, "resume")
    for args in (
        ["resume", str(folder)],
        [
            "run",
            "jobs/smoke.yaml",
            "--input",
            str(data),
            "--output",
            str(tmp_path / "out"),
            "--run-id",
            "done",
            "--resume",
            "--set",
            "report.enabled=false",
        ],
    ):
        res = _zsad(*args, env=env, ray=True)  # the default executor, as a user (or a retry loop) runs it
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"run done already succeeded (finished at {record['ended']}); nothing to do" in res.stdout
        assert "run done: succeeded" in res.stdout and f"{folder}/run.json" in res.stdout  # the run's summary
        assert not _ray_started(env) and _tree(folder) == before
    other = _zsad(
        "run",
        "jobs/smoke.yaml",
        "--input",
        str(data),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "done",
        "--resume",
        "--set",
        "score.temperature=0.02",
        env=env,
        ray=True,
    )
    assert other.returncode == 2 and "was started with a different job spec" in other.stderr
    assert _tree(folder) == before


def test_adapters_at_a_uri_that_do_not_fit_stop_the_run_without_resume_advice(tmp_path, data, s3_bucket):
    """What the driver cannot see (adapters at a URI, fetched by the model stage) still stops the run
    on its spec: exit 2, the loader's reason, and the advice to start a new run, not to resume."""
    from pipeline.io import fs as fsio
    from pipeline.models.adapters import Adapters, save_adapters

    wide = tmp_path / "wide.safetensors"
    save_adapters(Adapters(1024, 768, 4), str(wide), {})
    uri = f"s3://{s3_bucket}/wide.safetensors"
    fsio.write_bytes(uri, wide.read_bytes(), fsio.storage_options())
    res = _zsad(
        "run",
        "jobs/aprilgan.yaml",
        *TINY,
        "--set",
        f"pixel.weights={uri}",
        "--input",
        str(data),
        "--output",
        str(tmp_path / "out"),
        "--run-id",
        "wide",
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "AdapterLoadError" in res.stderr and "fix them and start a new run" in res.stderr
    assert "zsad resume" not in res.stderr + res.stdout
