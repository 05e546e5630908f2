"""How far bf16 (autocast) results lie from fp32, per method, on the REAL architectures.

Random weights (the pretrained ones cannot be downloaded on the benchmark machines; no accuracy is
measured or implied; pretrained weights have other activation statistics, so treat these as the
order of magnitude), generated 512 x 512 images of a synthetic category with defects. Each method
runs through the code a run uses: ``ClipScoreStage.score_images`` with the preset's settings
(``clip.precision`` fp32, then bf16 on the same images); MuSc's mutual maps through
``pipeline.models.mutual`` on the images as their own pool; SAM's image encoder through
``SamEngine.embed``. The device is the CPU unless ``--device cuda`` (CPU autocast runs bf16 too; a
GPU's bf16 kernels round differently, so its figures can differ somewhat: ``gpu_suite.py`` reports
them per stage).

Reported per method: max |score difference|, max |map difference| (the map's own range is given),
and for SAM the relative L2 difference of the image embedding.

Usage: python benchmarks/bench_precision.py [--images 3] [--only default,winclip,...] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

METHODS = {  # name -> (preset, its own overrides)
    "winclip": ("winclip.yaml", []),
    "default": ("default.yaml", []),  # FADE zero-shot maps, VVV prompts
    "aprilgan": ("aprilgan.yaml", ["pixel.weights=null"]),
    "musc_fast": ("musc_fast.yaml", []),
    "sam_vit_b": (None, []),
}


def _images(n: int):
    import tempfile

    import numpy as np
    from PIL import Image

    from pipeline.synthetic import make_dataset

    root = tempfile.mkdtemp(prefix="zsad-precision-")
    make_dataset(root, categories=("widget",), n_good=1, n_bad=n - 1, n_train=0, size=512, seed=3)
    paths = sorted(p for p in __import__("pathlib").Path(root, "widget", "test").glob("*/*.png"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths[:n]]


def _stage_method(job: str, sets: list[str], images, device: str) -> dict:
    import numpy as np

    from pipeline.config import load_spec
    from pipeline.stages.clip_score import ClipScoreStage

    out, times = {}, {}
    for p in ("fp32", "bf16"):
        spec = load_spec(os.path.join(REPO, "jobs", job), ["clip.weights=null", "allow_random_weights=true", *sets,
                                                           f"clip.precision={p}"])
        stage = ClipScoreStage(spec.clip, spec.score, pixel=spec.pixel, maps=spec.maps, map_range=spec.map_range(),
                               use_gpu=device == "cuda")
        stage.setup()
        t = time.perf_counter()
        out[p] = stage.score_images(images, ["widget"] * len(images))
        times[p] = round(time.perf_counter() - t, 2)
        model = spec.clip.model
        lo, hi = spec.map_range()
    a, b = out["fp32"], out["bf16"]
    d_map = max((float(np.abs(x - y).max()) for x, y in zip(a["maps"], b["maps"])), default=None)
    return {"model": model, "score_max_abs": float(np.abs(a["score"] - b["score"]).max()), "map_max_abs": d_map,
            "map_range": [lo, hi], "seconds": times}


def _mutual(job: str, images, device: str) -> dict:
    import dataclasses

    import numpy as np
    import torch

    from pipeline.config import load_spec
    from pipeline.models import clip as clip_models
    from pipeline.models import mutual, precision

    spec = load_spec(os.path.join(REPO, "jobs", job), ["clip.weights=null", "allow_random_weights=true"])
    model, pre = clip_models.build_clip(spec.clip.model, image_size=spec.clip.image_size, device=device)
    pre = dataclasses.replace(pre, resize=spec.clip.resize, size=spec.pixel.image_size)
    batch = clip_models.preprocess_images([torch.from_numpy(np.array(im)) for im in images], pre, device=device)
    res, times = {}, {}
    n = len(images)
    for p in ("fp32", "bf16"):
        t = time.perf_counter()
        with torch.inference_mode(), precision.active(device, p):
            emb, tokens, grid = mutual.image_features(model.visual, batch, spec.pixel.layers)
            queries = mutual.query_features(tokens, spec.pixel.layers, spec.pixel.degrees, grid)
            pool = {l: mutual.layer_norm_map(t) for l, t in zip(spec.pixel.layers, tokens)}
            exclude = torch.eye(n, dtype=torch.bool)
            k = mutual.interval_k(n - 1, spec.mutual.interval)
            grids = mutual.mutual_map(queries, pool, grid, k, exclude)
            side = spec.pixel.image_size
            score = mutual.upsample(grids, (side, side)).amax(dim=(1, 2))
        res[p] = (score.double().cpu().numpy(), grids.cpu().numpy())
        times[p] = round(time.perf_counter() - t, 2)
    return {"model": spec.clip.model, "score_max_abs": float(np.abs(res["fp32"][0] - res["bf16"][0]).max()),
            "map_max_abs": float(np.abs(res["fp32"][1] - res["bf16"][1]).max()), "map_range": [0.0, 2.0],
            "seconds": times, "pool": f"the {n} images (each compared with the other {n - 1})"}


def _sam(images, device: str) -> dict:
    from pipeline.models.sam import SamEngine, build_sam

    sam = build_sam("vit_b", device=device)
    feats, times = {}, {}
    for p in ("fp32", "bf16"):
        engine = SamEngine(sam, device=device, precision=p)
        t = time.perf_counter()
        feats[p] = engine.embed(images[0]).features
        times[p] = round(time.perf_counter() - t, 2)
    rel = float((feats["bf16"] - feats["fp32"]).norm() / feats["fp32"].norm())
    return {"model": "SAM vit_b image encoder", "embedding_rel_l2": rel, "seconds": times, "images": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--only", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    import torch
    from _machine import cpu_name

    images = _images(max(args.images, 5 if "musc_fast" in args.only else args.images))
    results = {}
    for name in args.only.split(","):
        job, sets = METHODS[name]
        t = time.perf_counter()
        if name == "sam_vit_b":
            results[name] = _sam(images, args.device)
        elif name.startswith("musc"):
            results[name] = _mutual(job, images[: max(args.images, 5)], args.device)
        else:
            results[name] = _stage_method(job, sets, images[: args.images], args.device)
        print(f"{name}: {json.dumps(results[name])} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(json.dumps({"device": args.device, "cpu": cpu_name(), "torch": torch.__version__, "images": args.images,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
