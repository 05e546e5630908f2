"""CPU-task workers import the wrapper module and their stage only: no torch, no open_clip there
(each worker that imports torch costs about 0.9 GB of memory)."""

import subprocess
import sys


def test_cpu_stages_and_the_udf_module_do_not_import_torch():
    code = ("import sys; import pipeline.runtime.udf, pipeline.stages.decode, pipeline.stages.tiling, "
            "pipeline.stages.aggregate, pipeline.stages.encode; "
            "print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'segment_anything') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_jobs_client_does_not_import_torch():
    code = "import sys; import pipeline.runtime.jobs; print('torch' in sys.modules, 'ray.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"



def test_the_driver_checks_specs_and_plans_a_run_without_torch(tmp_path):
    """The driver of zsad run / validate / train reads the stages' declarations and checks model
    names (from the registry file) but runs no model: importing torch and open_clip there cost
    seconds per command. Here: validate every preset, then a dry run (listing, preflight, plan)."""
    import os
    from pathlib import Path

    from tests.helpers.badfiles import write_good_images

    write_good_images(tmp_path / "in" / "parts", 2, size=(32, 32))
    code = (
        "import glob, sys; from pipeline.cli import app\n"
        "for args in (['validate', *sorted(glob.glob('jobs/*.yaml'))],\n"
        f"             ['run', 'jobs/smoke.yaml', '--input', {str(tmp_path / 'in')!r}, "
        "'--output', 'unused', '--dry-run']):\n"
        "    try:\n"
        "        app(args, standalone_mode=False)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'torchvision', 'segment_anything') if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "ZSAD_CACHE_DIR": str(tmp_path / "cache")}
    warm = subprocess.run(
        [sys.executable, "-c", "from pipeline.models.registry import models; models()"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fills the registry file
    assert warm.returncode == 0, warm.stderr
    assert list((tmp_path / "cache").glob("open_clip-*.json"))
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
