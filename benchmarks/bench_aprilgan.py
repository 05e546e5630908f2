"""APRIL-GAN on the CPU: adapter maps of the REAL architecture and training-step times.

Model: CLIP ViT-L-14-336 (open_clip) with RANDOM weights and random adapters (pretrained weights
cannot be downloaded on the benchmark machines; time and memory do not depend on the values; no
accuracy is measured or implied), and zsad's tiny test model. Images: generated RGB.

Each measurement runs in its own subprocess so its peak RSS (ru_maxrss) is its own:
  map_vitl      score + adapter map per image, ViT-L-14-336 at 518 px, layers 6/12/18/24, batch 1,
                through the clip_score stage (jobs/aprilgan.yaml's settings, random weights)
  step_tiny     one training step (batch 8 at 128 px, 4 layers) of the tiny model
  step_vitl     one training step (batch 2 at 518 px) of ViT-L-14-336

Usage: python benchmarks/bench_aprilgan.py [--images 3] [--steps 3] [--threads 2] [--only map_vitl,step_tiny,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

KINDS = ("map_vitl", "step_tiny", "step_vitl")
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _map(n_images: int) -> dict:
    import numpy as np
    import torch

    from pipeline.config import MapOutputSpec, load_spec
    from pipeline.stages.clip_score import ClipScoreStage

    spec = load_spec(os.path.join(REPO, "jobs", "aprilgan.yaml"),
                     ["clip.weights=null", "pixel.weights=null", "allow_random_weights=true"])
    stage = ClipScoreStage(
        spec.clip, spec.score, pixel=spec.pixel, maps=MapOutputSpec(map_size=256), map_range=spec.map_range()
    )
    stage.setup()
    stage.text_classifier("bottle")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (700, 700, 3), dtype=np.uint8) for _ in range(n_images + 1)]
    base = rss_mb()
    times = []
    for i, img in enumerate(images):
        t0 = time.perf_counter()
        with torch.inference_mode():
            stage.score_images([img], ["bottle"])
        if i:
            times.append(time.perf_counter() - t0)
    return {
        "seconds_per_image_min": round(min(times), 3),
        "seconds_per_image_median": round(sorted(times)[len(times) // 2], 3),
        "rss_after_setup_mb": round(base, 1),
        "peak_rss_mb": round(rss_mb(), 1),
    }


def _steps(model_name: str, size: int, batch: int, layers: tuple[int, ...], steps: int) -> dict:
    import numpy as np
    import torch

    from pipeline.models import adapter_training as training
    from pipeline.models import adapters as adapter_models
    from pipeline.models import clip as clip_models

    model, pre = clip_models.build_clip(model_name)
    for p in model.parameters():
        p.requires_grad_(False)
    visual = model.visual
    adapters = adapter_models.Adapters(visual.transformer.width, int(visual.output_dim), len(layers))
    optimizer = training.make_optimizer(adapters, 1e-3, (0.5, 0.999))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    masks = torch.zeros(batch, size, size)
    masks[:, size // 3 : size // 2, size // 3 : size // 2] = 1
    e = visual.output_dim
    text = torch.nn.functional.normalize(torch.randn(e, 2), dim=0).expand(batch, -1, -1)
    base = rss_mb()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        training.train_step(visual, adapters, optimizer, x, masks, text, layers)
        if i:
            times.append(time.perf_counter() - t0)
    return {
        "batch": batch,
        "size": size,
        "seconds_per_step_min": round(min(times), 3),
        "seconds_per_step_median": round(sorted(times)[len(times) // 2], 3),
        "seconds_per_image_median": round(sorted(times)[len(times) // 2] / batch, 3),
        "rss_after_setup_mb": round(base, 1),
        "peak_rss_mb": round(rss_mb(), 1),
    }


def measure(kind: str, n_images: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    if kind == "map_vitl":
        out = _map(n_images)
    elif kind == "step_tiny":
        out = _steps("zsad-tiny", 128, 8, (2, 4, 6, 8), steps)
    elif kind == "step_vitl":
        out = _steps("ViT-L-14-336", 518, 2, (6, 12, 18, 24), steps)
    else:
        raise SystemExit(f"unknown measurement {kind}")
    return {"kind": kind, "threads": threads, **out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(KINDS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.images, args.steps, args.threads)))
        return
    for kind in args.only.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                kind,
                "--images",
                str(args.images),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{kind} failed")
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
