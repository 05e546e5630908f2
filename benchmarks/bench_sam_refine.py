"""SAM refinement (the CLIP-SAM cascade) per image on the CPU: the encoder once, then each decoder
step, through the sam_refine stage's own code.

Model: a segment-anything architecture (default ``vit_b``) with RANDOM weights (the checkpoints
cannot be downloaded on the benchmark machines; time does not depend on the weight values; no mask
quality is measured). Images: generated 640 x 480 scenes with a CLIP-like map that has one hot
region. Each allocator configuration runs in its own process, side by side: glibc's defaults, the
``MALLOC_*`` variables set at process start (BENCHMARKS.md "Foreground stage"), and
:func:`pipeline.models.sam.keep_freed_memory` called in the running process (what the SAM pools do).

Usage: python benchmarks/bench_sam_refine.py [--model vit_b] [--images 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ENV = {"MALLOC_MMAP_THRESHOLD_": "10000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}


def measure(model: str, n_images: int, threads: int, allocator: str) -> dict:
    import resource

    import numpy as np
    import torch

    if allocator == "mallopt":  # what the SAM pools do at start (sam.cpu_allocator: keep_freed)
        from pipeline.models.sam import keep_freed_memory

        assert keep_freed_memory(), "mallopt is not available"

    torch.set_num_threads(threads)
    from pipeline.config import SamRefineSpec
    from pipeline.models.sam import SamEngine, build_sam
    from pipeline.ops import points as pts
    from pipeline.ops.heatmap import resize_map

    engine = SamEngine(build_sam(model))
    cfg = SamRefineSpec()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n_images + 1):
        img = np.clip(rng.normal(120, 15, (480, 640, 3)), 0, 255).astype(np.uint8)
        img[200:260, 300:380] = (220, 40, 40)
        stored = np.zeros((192, 256), np.float32)
        stored[80:104, 120:152] = 0.9
        t0 = time.perf_counter()
        full = resize_map(stored, (480, 640))
        region = pts.extreme_region(full, cfg.threshold_mode, cfg.threshold)
        emb = engine.embed(img)
        t_embed = time.perf_counter()
        positive = pts.positive_points(full, region, k=cfg.positive_points, min_distance=cfg.min_distance)
        features = emb.features[0].float().numpy()
        negative = pts.negative_points(
            features,
            region,
            pts.ring(region, cfg.ring_kernel),
            emb.input_size,
            emb.original_size,
            k=cfg.negative_points,
            min_distance=cfg.min_distance,
        )
        t_points = time.perf_counter()
        points = np.concatenate([positive, negative]).astype(np.float32)
        labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))]).astype(np.int64)
        step_times = []
        for steps in (1, 2, 3):  # each step's cost = cascade(steps) - cascade(steps - 1)
            t = time.perf_counter()
            engine.cascade(emb, points, labels, steps=steps)
            step_times.append(time.perf_counter() - t)
        if k:
            rows.append(
                {
                    "embed": t_embed - t0,
                    "points": t_points - t_embed,
                    "cascade_1": step_times[0],
                    "cascade_2": step_times[1],
                    "cascade_3": step_times[2],
                }
            )
    # the alternative to encoding again after a SAM foreground stage: the embedding travels with the
    # row; its cost is an Arrow round trip (the stage's typed output, then the next stage's numpy view)
    import pyarrow as pa

    from pipeline.runtime.udf import to_arrow, to_numpy
    from pipeline.stages.records import TENSOR

    features = emb.features[0].float().numpy()
    trips = []
    for _ in range(5):
        t = time.perf_counter()
        block = to_arrow(
            {"sam_embedding": np.array([features], dtype=object)},
            {"sam_embedding": TENSOR},
            pa.table({"x": [0]}),
            {},
            "bench",
        )
        np.asarray(to_numpy(block)["sam_embedding"][0]).sum()
        trips.append(time.perf_counter() - t)
    for r in rows:
        r["embedding_arrow_round_trip"] = float(np.median(trips))
    med = {key: round(1000 * float(np.median([r[key] for r in rows])), 1) for key in rows[0]}
    med["embedding_mb"] = round(features.nbytes / 1e6, 2)
    return {
        "model": model,
        "images": n_images,
        "threads": threads,
        "allocator": allocator,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "ms_median": med,
        "step_ms": {
            "step1": med["cascade_1"],
            "step2": round(med["cascade_2"] - med["cascade_1"], 1),
            "step3": round(med["cascade_3"] - med["cascade_2"], 1),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", choices=["default", "env", "mallopt"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.images, args.threads, args.one)))
        return
    # glibc defaults; the two variables at process start; mallopt from inside the running process
    for allocator in ("default", "env", "mallopt"):
        full = {k: v for k, v in os.environ.items() if k not in ENV}
        full.update(ENV if allocator == "env" else {}, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                allocator,
                "--model",
                args.model,
                "--images",
                str(args.images),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            env=full,
        )
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit("measurement failed")
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
