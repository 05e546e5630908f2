"""Pool storage dtype: ``mutual.pool_dtype`` float16 against float32 on the real architectures (issue 28),
random weights, CPU.

For each preset (jobs/musc_fast.yaml: ViT-B-16-plus-240 at 240 px, blocks 3/6/9/12; jobs/musc.yaml:
ViT-L-14-336 at 518 px, blocks 6/12/18/24), N generated images of one category (pipeline.synthetic:
normal images and images with a drawn defect) form the pool, written twice by the bank stage's own
code (the part files the actors write, float32 and float16), and every image is scored against it
by the mutual scoring stage (itself left out, as in a run). Reported: pool bytes per image for both
dtypes, and the deviation of float16 from float32: largest absolute difference of the image score
(score_mutual, range [0, 2]) and of the stored map values, and whether the score ranking is the same.

Random weights: the deviations say what the storage dtype does to the computation, not accuracy.

Usage:
  .venv/bin/python benchmarks/bench_pool_dtype.py [--presets musc_fast musc] [--images 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
from _machine import cpu_name  # benchmarks/ is on sys.path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def spec_for(preset: str, dtype: str):
    from pipeline.config import load_spec

    path = os.path.join(ROOT, "jobs", f"{preset}.yaml")
    sets = ["clip.weights=null", "allow_random_weights=true", "resources.clip_score.num_gpus=0",
            f"mutual.pool_dtype={dtype}", "maps.map_size=64"]
    return load_spec(path, sets)


def images(n: int, folder: str) -> list[np.ndarray]:
    from PIL import Image

    from pipeline.synthetic import make_dataset

    make_dataset(folder, categories=("gear",), n_good=n - n // 2, n_bad=n // 2, size=256)
    paths = sorted(glob.glob(os.path.join(folder, "gear", "test", "*", "*.png")))[:n]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def run(preset: str, imgs: list[np.ndarray], folder: str) -> dict:
    from pipeline.io.banks import StoredBank, manifest_uri, write_manifest
    from pipeline.stages.bank import BankStage, BankTarget, bank_digest
    from pipeline.stages.clip_score import ClipScoreStage

    ids = [f"img{i:03d}" for i in range(len(imgs))]
    batch = {"image": np.empty(len(imgs), object), "image_id": np.array(ids, object),
             "category": np.array(["gear"] * len(imgs), object), "status": np.array(["ok"] * len(imgs), object),
             "error_stage": np.array([None] * len(imgs), object), "error_type": np.array([None] * len(imgs), object),
             "error_message": np.array([None] * len(imgs), object)}
    for i, im in enumerate(imgs):
        batch["image"][i] = im
    out, seconds, sizes = {}, {}, {}
    scorer = None
    for dtype in ("float32", "float16"):
        spec = spec_for(preset, dtype)
        digest = bank_digest(spec, "bench", len(imgs), "fp32")
        stage = BankStage.from_spec(
            spec, target=BankTarget(os.path.join(folder, dtype), "pools", {"gear": digest}, dtype)
        )
        if scorer is not None:  # one model: the same random weights for both dtypes
            stage.scorer.model, stage.scorer.preprocess = scorer.model, scorer.preprocess
            stage.scorer.device, stage.scorer.precision = scorer.device, scorer.precision
        t0 = time.perf_counter()
        rows = stage(dict(batch))
        assert set(rows["status"]) == {"ok"}, rows["error_message"]
        parts = {
            n: {"name": n, "bytes": int(b), "sha256": h}
            for n, b, h in zip(rows["bank_part"], rows["bank_part_bytes"], rows["bank_part_sha256"])
        }
        uri = manifest_uri(os.path.join(folder, dtype), "gear", "pools")
        write_manifest(
            uri,
            {
                "category": "gear",
                "digest": digest,
                "precision": "fp32",
                "image_ids": ids,
                "parts": list(parts.values()),
            },
        )
        stored = StoredBank(uri, digest)
        sizes[dtype] = stored.image_bytes([f"layer{l}" for l in spec.pixel.layers])
        score = ClipScoreStage.from_spec(spec)
        score.model, score.preprocess, score.device, score.precision = (
            stage.scorer.model,
            stage.scorer.preprocess,
            stage.scorer.device,
            stage.scorer.precision,
        )
        score.pools = {"gear": {"uri": uri, "digest": digest, "images": len(ids), "image_ids": ids}}
        res = score(dict(batch))
        assert set(res["status"]) == {"ok"}, res["error_message"]
        seconds[dtype] = time.perf_counter() - t0
        out[dtype] = res
        scorer = stage.scorer
    a, b = out["float32"], out["float16"]
    d_score = float(np.max(np.abs(np.asarray(a["score"]) - np.asarray(b["score"]))))
    d_map = max(float(np.max(np.abs(x - y))) for x, y in zip(a["anomaly_map"], b["anomaly_map"]))
    same_rank = bool((np.argsort(a["score"], kind="stable") == np.argsort(b["score"], kind="stable")).all())
    spec = spec_for(preset, "float32")
    return {
        "preset": preset,
        "model": spec.clip.model,
        "size": spec.pixel.image_size,
        "layers": list(spec.pixel.layers),
        "images": len(imgs),
        "bytes_per_image_f32": sizes["float32"],
        "bytes_per_image_f16": sizes["float16"],
        "max_abs_score_diff": d_score,
        "max_abs_map_diff": d_map,
        "score_range": [float(np.min(a["score"])), float(np.max(a["score"]))],
        "same_ranking": same_rank,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["musc_fast", "musc"])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(
        f"# pool dtype, {dt.date.today()}, {cpu_name()} ({os.cpu_count()} cores), Python {platform.python_version()}, "
        "random weights, CPU"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        imgs = images(args.images, os.path.join(tmp, "data"))
        for preset in args.presets:
            rows.append(run(preset, imgs, os.path.join(tmp, preset)))
            print(json.dumps(rows[-1]), flush=True)
    print(
        "| preset (model @ px) | images | pool MB/image f32 -> f16 | max abs score diff | max abs map diff | "
        "same ranking |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['preset']} ({r['model']} @ {r['size']}) | {r['images']} | {r['bytes_per_image_f32'] / 1e6:.2f} -> "
            f"{r['bytes_per_image_f16'] / 1e6:.2f} | {r['max_abs_score_diff']:.2e} | {r['max_abs_map_diff']:.2e} | "
            f"{r['same_ranking']} |"
        )
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
