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
