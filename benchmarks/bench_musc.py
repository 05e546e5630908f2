"""Mutual scoring (MuSc) on CPU: feature extraction per image on the real backbones, mutual-scoring time
per image against pools of R = 50 and 200 images, and a scoring actor over whole categories of 200,
800 and 3200 images (time linear in the category's size at fixed R, memory flat).

All models have RANDOM weights (pretrained ones cannot be downloaded on the benchmark machines; time and
memory do not depend on the weight values; no accuracy is measured or implied). Images are generated.

Phases, each in its own subprocess so that its peak RSS (ru_maxrss) is its own:
  features MODEL      pipeline.models.mutual.image_features + the 12 LNAMD maps, per image (batch 2),
                      ViT-B-16-plus-240 at 240 px (blocks 3/6/9/12) and ViT-L-14-336 at 518 (6/12/18/24)
  scoring MODEL R     one query image's mutual map against R + 1 pool images' features of MODEL's
                      shape (M patches x C channels, random values: the cost does not depend on them),
                      through pipeline.models.mutual.mutual_map with the presets' chunk sizes
  archive R           the pipeline's scoring stage (ClipScoreStage with the mutual scorer, tiny CLIP at
                      128 px, 4 blocks) holding one pool of R + 1 images scores categories of 200, 800 and
                      3200 generated images in batches of 8, one after another in one process: seconds per
                      category, ms per image and the process's peak RSS after each category

Usage: python benchmarks/bench_musc.py [--phases features,scoring,archive] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BACKBONES = {"ViT-B-16-plus-240": (240, (3, 6, 9, 12)), "ViT-L-14-336": (518, (6, 12, 18, 24))}
CATEGORIES = (200, 800, 3200)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _images(n: int, size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(8, 8, 3)).astype(np.float32)
    out = []
    for i in range(n):
        img = np.kron(base, np.ones((size // 8, size // 8, 1), np.float32)) + rng.normal(0, 12, (size, size, 3))
        y, x = rng.integers(0, size - 12, 2)
        if i % 5 == 0:  # a small defect in one image of five
            img[y : y + 10, x : x + 10] = 255
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def phase_features(model_name: str) -> dict:
    import torch

    from pipeline.models import clip as clip_models
    from pipeline.models import mutual

    size, layers = BACKBONES[model_name]
    model, pre = clip_models.build_clip(model_name)
    pre = type(pre)(**{**pre.__dict__, "size": size, "resize": "pil"})
    imgs = [torch.from_numpy(a) for a in _images(4, 256, 1)]
    times = []
    with torch.inference_mode():
        for rep in range(3):  # first is the warm-up
            t0 = time.perf_counter()
            batch = clip_models.preprocess_images(imgs[:2], pre)
            _, tokens, grid = mutual.image_features(model.visual, batch, layers)
            mutual.query_features(tokens, layers, (1, 3, 5), grid)
            times.append((time.perf_counter() - t0) / 2)
    return {
        "model": model_name,
        "size": size,
        "grid": grid,
        "width": tokens[0].shape[-1],
        "ms_per_image": round(1000 * min(times[1:]), 1),
        "peak_rss_mb": round(rss_mb(), 1),
    }


def phase_scoring(model_name: str, r: int) -> dict:
    import torch
    import torch.nn.functional as F

    from pipeline.config import MutualSpec
    from pipeline.models import mutual

    size, layers = BACKBONES[model_name]
    grid = size // (16 if "B-16" in model_name else 14)
    width = 896 if "B-16" in model_name else 1024
    m, spec = grid * grid, MutualSpec()
    g = torch.Generator().manual_seed(0)
    pool = {l: mutual.layer_norm_map(torch.randn(r + 1, m, width, generator=g)) for l in layers}
    q = mutual.query_features([torch.randn(1, m, width, generator=g) for _ in layers], layers, (1, 3, 5), grid)
    exclude = F.one_hot(torch.tensor([r]), r + 1).bool()  # a query outside the pool leaves out its last image
    k = mutual.interval_k(r, spec.interval)
    t0 = time.perf_counter()
    mutual.mutual_map(q, pool, grid, k, exclude, spec.query_chunk, spec.pool_chunk)
    s = time.perf_counter() - t0
    return {
        "model": model_name,
        "R": r,
        "K": k,
        "patches": m,
        "width": width,
        "ms_per_image": round(1000 * s, 1),
        "pool_mb": round(len(layers) * (r + 1) * m * width * 4 / 2**20, 1),
        "peak_rss_mb": round(rss_mb(), 1),
    }


def phase_archive(r: int) -> dict:
    import numpy as np

    from pipeline.config import load_spec
    from pipeline.stages.clip_score import ClipScoreStage

    tiny = [
        "clip.model=zsad-tiny",
        "clip.weights=null",
        "allow_random_weights=true",
        "resources.clip_score.num_gpus=0",
        "pixel.layers=[2,4,6,8]",
        "pixel.image_size=128",
        "maps.map_size=64",
        f"mutual.pool_size={r}",
    ]
    spec = load_spec(os.path.join(HERE, "..", "jobs", "musc.yaml"), tiny)
    stage = ClipScoreStage.from_spec(spec)
    stage.setup()
    pool_images = _images(r + 1, 128, 7)
    feats = [f for i in range(0, len(pool_images), 16) for f in stage.bank_features(pool_images[i : i + 16])]
    import torch

    stage.pools = {"cat": {"images": r + 1}}
    stage._pool_cache["cat"] = {
        "layers": {l: torch.from_numpy(np.concatenate([f[f"layer{l}"] for f in feats])) for l in spec.pixel.layers},
        "ids": [f"pool{i}" for i in range(r + 1)],
    }
    rows = []
    base_rss = rss_mb()
    stage.score_images(_images(8, 128, 99), ["cat"] * 8, image_ids=[f"w{i}" for i in range(8)])  # warm-up
    for n in CATEGORIES:
        t0 = time.perf_counter()
        for b0 in range(0, n, 8):
            b = min(8, n - b0)
            stage.score_images(
                _images(b, 128, 1000 * n + b0), ["cat"] * b, image_ids=[f"q{n}-{b0 + i}" for i in range(b)]
            )
        s = time.perf_counter() - t0
        rows.append(
            {
                "category_images": n,
                "seconds": round(s, 2),
                "ms_per_image": round(1000 * s / n, 2),
                "peak_rss_mb": round(rss_mb(), 1),
            }
        )
    return {"R": r, "pool_loaded_rss_mb": round(base_rss, 1), "categories": rows}


def _child(args: list[str], threads: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.path.join(HERE, ".."),
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args, "--threads", str(threads)], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"phase {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="features,scoring,archive")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--scoring",
        default="ViT-B-16-plus-240:50,ViT-B-16-plus-240:200,ViT-L-14-336:50",
        help="MODEL:R pairs for the scoring phase",
    )
    ap.add_argument("--archive-r", default="50,200")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs="*")
    a = ap.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        kind, *rest = a.child
        result = {
            "features": lambda: phase_features(rest[0]),
            "scoring": lambda: phase_scoring(rest[0], int(rest[1])),
            "archive": lambda: phase_archive(int(rest[0])),
        }[kind]()
        print(json.dumps(result))
        return
    sys.path.insert(0, HERE)
    from _machine import cpu_name

    results: dict = {
        "machine": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "threads": a.threads,
        "random_weights": True,
    }
    phases = a.phases.split(",")
    if "features" in phases:
        results["features"] = [_child(["features", m], a.threads) for m in BACKBONES]
        for row in results["features"]:
            print(
                f"features {row['model']} @{row['size']}: {row['ms_per_image']} ms/image, "
                f"peak RSS {row['peak_rss_mb']} MB",
                flush=True,
            )
    if "scoring" in phases:
        results["scoring"] = []
        for pair in a.scoring.split(","):
            model, r = pair.split(":")
            row = _child(["scoring", model, r], a.threads)
            results["scoring"].append(row)
            print(
                f"scoring {model} R={r} (K={row['K']}): {row['ms_per_image']} ms/image, pool {row['pool_mb']} MB, "
                f"peak RSS {row['peak_rss_mb']} MB",
                flush=True,
            )
    if "archive" in phases:
        results["archive"] = []
        for r in a.archive_r.split(","):
            row = _child(["archive", r], a.threads)
            results["archive"].append(row)
            for c in row["categories"]:
                print(
                    f"archive R={r}: {c['category_images']} images in {c['seconds']} s = {c['ms_per_image']} ms/image, "
                    f"peak RSS {c['peak_rss_mb']} MB (pool loaded: {row['pool_loaded_rss_mb']} MB)",
                    flush=True,
                )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
