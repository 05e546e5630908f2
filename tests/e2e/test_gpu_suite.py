"""benchmarks/gpu_suite.py --dry-run: every step of the GPU suite runs through the same step
functions with tiny models on the CPU (micro steps, the clip_score stage steps, `zsad run` of
jobs/default.yaml and jobs/vvv.yaml, separate and fused pools, on the in-process executor: the suite's
paths are checked here, Ray by the tests of Ray) and writes its JSON and Markdown."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STEPS = ["clip_image_scores", "winclip_windows", "fade_zero_shot", "april_gan_518", "sam_vit_h_encoder",
         "jpeg_decode", "e2e_default", "e2e_vvv", "e2e_vvv_fused"]


def test_gpu_suite_dry_run_runs_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--out-dir", str(tmp_path),
                          "--e2e-images", "6", "--vvv-images", "3", "--budget-s", "240",
                          # the suite's paths, not Ray: its e2e runs on the in-process executor
                          "--e2e-executor", "local"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert doc["dry_run"] is True and doc["device"]["kind"] == "cpu" and doc["random_weights"] is True
    assert {"torch", "cuda", "open_clip", "ray"} <= set(doc["versions"]) and doc["date"]
    steps = {s["step"]: s for s in doc["steps"]}
    assert list(steps) == STEPS
    for name, step in steps.items():
        assert step["status"] == "ok", (name, step.get("error"), step.get("traceback"))
        assert step["rows"] and all(r["status"] == "ok" and r["images_per_s"] > 0 for r in step["rows"]), name
    assert all(r["tflops"] > 0 for r in steps["sam_vit_h_encoder"]["rows"])
    assert all(r["tflops"] > 0 for r in steps["clip_image_scores"]["rows"])
    assert {r["precision"] for r in steps["clip_image_scores"]["rows"]} == {"fp32", "bf16"}  # the autocast path too
    for name in ("winclip_windows", "fade_zero_shot", "april_gan_518"):  # bf16 measured against fp32 on the same images
        bf16 = [r for r in steps[name]["rows"] if r["precision"] == "bf16"]
        assert bf16 and 0 < bf16[0]["deviation_vs_fp32"]["score_max_abs"] < 0.05, (name, bf16)
    for name, asked in (("e2e_default", 6), ("e2e_vvv", 3), ("e2e_vvv_fused", 3)):
        e2e = steps[name]["e2e"]
        assert e2e["images_asked"] == e2e["images_used"] == e2e["images_scored"] == asked, (name, e2e)
        assert e2e["run_status"] == "succeeded" and e2e["counts"]["failed"] == 0, (name, e2e)
        assert (tmp_path / "e2e" / f"{name}.run.json").exists()
    fused = json.loads((tmp_path / "e2e" / "e2e_vvv_fused.run.json").read_text())
    assert [s["stage"] for s in fused["plan"]] == ["decode", "models", "aggregate", "encode"]
    assert fused["plan"][1]["fused"] == ["foreground", "tiling", "clip_score"]
    md = (tmp_path / "gpu_suite.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| step ")]
    assert [line.split("|")[1].strip() for line in rows] == [s for s in STEPS for _ in steps[s]["rows"]]
    assert md.strip() in res.stdout  # the table is printed too
