"""CPU throughput of a job preset (default jobs/winclip.yaml: ViT-B-16-plus-240, 240 px).

Random weights are allowed HERE ONLY, because pretrained weights cannot be downloaded on the
benchmark machines: throughput does not depend on the weight values, and the scores produced are
not results (the run manifest and every row say random_weights = true).

Measures two things on generated images:
  1. the end-to-end `zsad run` path (local Ray, decode tasks + one CLIP actor, Parquet writes):
     images / plan wall second, images / total wall second including Ray start-up, and the CLIP
     actor's own rate inside the run (images / seconds it spent scoring, from the clip_score_ms
     column);
  2. the scoring stage alone in this process (no Ray), images/s over warm batches.

Usage: python benchmarks/bench_cpu_throughput.py [--job jobs/winclip.yaml] [--images 64] [--size 512]
Prints a Markdown table row for BENCHMARKS.md and a JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time

import numpy as np
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from PIL import Image

RANDOM = ["clip.weights=null", "allow_random_weights=true"]




def make_images(folder: str, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "part"), exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "part", f"img_{i:04d}.png"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", default="jobs/winclip.yaml")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    from pipeline.config import load_spec
    from pipeline.runtime.run import run_job
    from pipeline.stages.clip_score import ClipScoreStage

    spec = load_spec(args.job, RANDOM + args.sets)
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "data"), os.path.join(tmp, "out")
        make_images(data, args.images, args.size)

        t0 = time.perf_counter()
        result = run_job(spec, data, out, run_id="bench", log=lambda m: None)
        total_s = time.perf_counter() - t0
        assert result.status == "succeeded", result.record.get("reason")
        plan_s = result.record["stage_seconds"]["plan_wall"]
        first_s = result.record["stage_seconds"]["first_result_wall"]
        busy_s = result.record["stage_seconds"]["clip_score_busy"]

        stage = ClipScoreStage(spec.clip, spec.score)
        stage.setup()
        bs = spec.resources.clip_score.batch_size
        rng = np.random.default_rng(1)
        imgs = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(bs)]
        stage.score_images(imgs[:2], ["part"] * 2)  # warm-up (and text embeddings)
        reps = max(1, 64 // bs)
        t1 = time.perf_counter()
        for _ in range(reps):
            stage.score_images(imgs, ["part"] * bs)
        stage_ips = reps * bs / (time.perf_counter() - t1)

    import torch

    record = {
        "date": dt.date.today().isoformat(),
        "job": args.job,
        "model": spec.clip.model,
        "random_weights": True,
        "images": args.images,
        "image_size": args.size,
        "batch_size": spec.resources.clip_score.batch_size,
        "machine": f"{os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "run_images_per_s_plan": round(args.images / plan_s, 2),
        "run_startup_s": round(first_s, 1),
        "run_actor_images_per_s": round(args.images / busy_s, 2),
        "run_images_per_s_total": round(args.images / total_s, 2),
        "stage_images_per_s": round(stage_ips, 2),
    }
    print(json.dumps(record))
    print(
        f"| {record['date']} | {record['machine']} | {args.job} ({spec.clip.model}, random weights) | "
        f"{args.images} x {args.size}px PNG | {record['run_startup_s']} | {record['run_actor_images_per_s']} | "
        f"{record['run_images_per_s_plan']} | {record['run_images_per_s_total']} | "
        f"{record['stage_images_per_s']} |"
    )


if __name__ == "__main__":
    main()
