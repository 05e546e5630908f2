"""One-GPU benchmark suite: model throughput (micro) and `zsad run` end to end, in one script.

Random weights throughout (the pretrained ones cannot be downloaded on the benchmark machines; time
does not depend on the weight values; no accuracy is measured or implied). Generated images.

Steps (each in its own try/except: a failing step records its error and the suite goes on):

  clip_image_scores  open_clip ViT-B-16-plus-240 and ViT-L-14-336 at batch 64 and 256, fp32 and bf16
                     (autocast): model forward only (pipeline.models.clip.encode_image on a batch
                     already on the device, plus the fp32 anomaly probability against a text
                     classifier); TFLOP/s from FlopCounterMode on one batch-1 forward
  winclip_windows    jobs/winclip.yaml's stage (ViT-B-16-plus-240, windows of 2 and 3 patches)
  fade_zero_shot     jobs/default.yaml's stage (FADE: GEM maps at 240/448/896, grid 56, vision map)
  april_gan_518      jobs/aprilgan.yaml's stage (ViT-L-14-336 at 518 px, layers 6/12/18/24, random
                     adapters)
                     The three stage steps drive pipeline.stages.clip_score.ClipScoreStage as a run
                     does per batch: score_images() on uint8 images on the host (preprocess +
                     forward + maps), at the preset's batch size, in bf16 and fp32.
  sam_vit_h_encoder  SAM vit_h's image encoder at 1024 px, batch 1 and 8, fp32 and bf16 (autocast),
                     TFLOP/s from FlopCounterMode on one batch-1 forward; plus SamEngine.embed on one
                     image (host resize + normalise + encoder: what the foreground stage does per image)
  jpeg_decode        decode.device: model's decoder on the device (torchvision decode_jpeg: nvJPEG on a
                     GPU) at batch 1 and 8 against the CPU decode stage's Pillow decode, a generated
                     12-MP JPEG to jobs/default.yaml's working size (1195 x 896)
  e2e_default        `zsad run jobs/default.yaml` (CLI subprocess, local Ray) on --e2e-images generated
                     PNGs (fewer when the FADE stage's rate says they would not fit the step's time)
  e2e_vvv            `zsad run jobs/vvv.yaml` (SAM vit_h automatic masks, 32 x 32 points) on
                     --vvv-images generated multi-object PNGs
  e2e_vvv_fused      the same run with runtime.fuse_models: true (SAM foreground, tiling and CLIP in one
                     actor pool) on the same images: separate pools against one fused pool
                     e2e images/s = counts.images / run.json wall_seconds (which includes Ray's start);
                     the notes add the steady rate (after the first result) and the CLIP (and SAM)
                     actors' own. Precision: the presets' default (auto: bf16 on a GPU), recorded as
                     auto resolves on the suite's device (run.json records only the spec's value).

The whole suite has a wall-clock budget (--budget-s, default 480): each step has its own cap and
gets at most what is left; a step that cannot start in what is left is skipped with the reason.
Results are written after every step: OUT_DIR/gpu_suite.json (per-step results, device, versions,
date) and OUT_DIR/gpu_suite.md (BENCHMARKS.md-ready table rows, also printed to stdout); the e2e
runs' logs and run.json go to OUT_DIR/e2e/.

--dry-run runs every step, through the same functions, with tiny models on the CPU (the CLIP config
zsad-tiny, the SAM `tiny`, tiny batches, a handful of small images, the e2e presets with the tests'
tiny overrides) in under a minute: it checks the suite, its numbers are not benchmarks. Its e2e
runs start together (each with its own local Ray) and are collected step by step; on a GPU they
run one after another, so that each has the machine to itself.

Usage:
  python benchmarks/gpu_suite.py --out-dir OUT [--budget-s 480] [--e2e-images 2000] [--vvv-images 200]
      [--steps clip_image_scores,...] [--image-size 512] [--stage-batch N] [--timed-s 3]
      [--device auto|cuda|cpu] [--keep-work DIR]
  python benchmarks/gpu_suite.py --dry-run --out-dir OUT
On the one-GPU machine (the repository root as the working directory; zsad need not be installed):
  PYTHONPATH=$PWD python3 benchmarks/gpu_suite.py --out-dir $OUT/gpu_suite --budget-s 450
The exit code is 0 whatever the steps did (their status is in the JSON); 2 for bad usage.

The suite's machinery (settings, timing helpers, the Suite that runs the steps and writes the
results) is in gpu_suite_base.py; the steps in gpu_suite_micro.py and gpu_suite_e2e.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite's modules, whatever the cwd

from gpu_suite_base import REPO, StepEntry, Suite, cuda_available, settings  # noqa: E402
from gpu_suite_e2e import step_e2e  # noqa: E402
from gpu_suite_micro import step_clip_image_scores, step_jpeg_decode, step_sam_encoder, step_stage  # noqa: E402

# ------------------------------------------------------------------------------------------ main

# step -> (function(suite, record, deadline), runs in this process (an alarm enforces its cap), minimum seconds)
STEP_TABLE: dict[str, StepEntry] = {
    "clip_image_scores": (step_clip_image_scores, True, 10),
    "winclip_windows": (step_stage("winclip_windows"), True, 8),
    "fade_zero_shot": (step_stage("fade_zero_shot"), True, 8),
    "april_gan_518": (step_stage("april_gan_518"), True, 10),
    "sam_vit_h_encoder": (step_sam_encoder, True, 10),
    "jpeg_decode": (step_jpeg_decode, True, 10),
    "e2e_default": (step_e2e("e2e_default"), False, 50),
    "e2e_vvv": (step_e2e("e2e_vvv"), False, 50),
    "e2e_vvv_fused": (step_e2e("e2e_vvv_fused"), False, 50),
}
STEPS = tuple(STEP_TABLE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "gpu_suite_out"),
                    help="where gpu_suite.json, gpu_suite.md and the e2e logs go (default benchmarks/gpu_suite_out)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock budget of the whole suite; steps that no longer fit are skipped (default 480)")
    ap.add_argument("--dry-run", action="store_true", help="every step with tiny models on the CPU (< 1 minute)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when available (cpu with --dry-run)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of: {', '.join(STEPS)}")
    ap.add_argument("--e2e-images", type=int, default=None,
                    help="images for e2e_default (default 2000; 8 with --dry-run); fewer when they would not fit")
    ap.add_argument("--vvv-images", type=int, default=None, help="images for e2e_vvv (default 200; 4 with --dry-run)")
    ap.add_argument("--image-size", type=int, default=None, help="side of the generated images (default 512; 128 dry)")
    ap.add_argument("--stage-batch", type=int, default=None,
                    help="batch of the stage steps (default: each preset's resources.clip_score.batch_size; 4 dry)")
    ap.add_argument("--timed-s", type=float, default=3.0, help="seconds timed per micro configuration (default 3)")
    ap.add_argument("--e2e-executor", choices=("ray", "local"), default="ray",
                    help="what runs the e2e steps' zsad runs: ray (default: a local Ray each, what the figures "
                         "are of) or local (the in-process executor: a quicker check of the suite's paths with "
                         "--dry-run)")
    ap.add_argument("--keep-work", default=None, metavar="DIR",
                    help="generate inputs and run outputs in DIR and keep them (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.steps.split(",") if s and s not in STEP_TABLE]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    for name in ("e2e_images", "vvv_images", "image_size", "stage_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = settings(args)
    if cfg.device == "cuda" and not cuda_available():
        print("[gpu_suite] --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    suite = Suite(args, cfg, STEP_TABLE)
    wanted = suite.wanted = [s for s in STEPS if s in args.steps.split(",")]
    print(f"[gpu_suite] {'DRY RUN (tiny models) ' if cfg.dry_run else ''}on {suite.header['device'].get('name')} "
          f"({cfg.device}); budget {suite.budget_s:.0f} s; steps: {', '.join(wanted)}; output {suite.out_dir}",
          file=sys.stderr, flush=True)
    try:
        for name in wanted:
            suite.run(name)
    except KeyboardInterrupt:
        print("[gpu_suite] interrupted: writing what was measured", file=sys.stderr)
    finally:
        suite.write()
        suite.close()
    print(suite.markdown())
    print(f"[gpu_suite] wrote {suite.out_dir / 'gpu_suite.json'} and {suite.out_dir / 'gpu_suite.md'} "
          f"in {time.monotonic() - suite.t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
