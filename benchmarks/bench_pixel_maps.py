"""Per-image CPU time and peak RSS of zsad's zero-shot pixel maps on the REAL architecture.

Model: ViT-B-16-plus-240 (open_clip), RANDOM weights (the pretrained ones cannot be downloaded on
the benchmark machines; time and memory do not depend on the weight values; no accuracy is
measured or implied). Images: generated 240 x 240 RGB.

Each measurement runs in its own subprocess so its peak RSS (ru_maxrss) is its own:
  winclip      WinCLIP windows (2 and 3 patches) + image score, per image (batch 1)
  winclip_int8 the same with clip.cpu_int8 (int8 MLPs); also reports the deviation from fp32
  gem240/448/896  one GEM dual-stream forward at that input size, per image
  fade         the whole FADE zero-shot map (240 + 448 + 896 GEM passes + vision maps) with the
               jobs/fade.yaml settings (PIL resize, wrapped sentences, GEM vision features)
Text embeddings are computed before timing (they are cached per category in the pipeline).

Usage: python benchmarks/bench_pixel_maps.py [--images 3] [--threads 2] [--only winclip,gem240,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

KINDS = ("winclip", "winclip_int8", "gem240", "gem448", "gem896", "fade")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(kind: str, n_images: int, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from pipeline.config import ClipSpec, MapOutputSpec, NoPixelMap, WinclipWindows, ZeroShotImageScore, load_spec
    from pipeline.models import clip as clip_models
    from pipeline.models import vit
    from pipeline.stages.clip_score import ClipScoreStage

    pixel = {"winclip": WinclipWindows(), "winclip_int8": WinclipWindows()}.get(kind, NoPixelMap())
    clip = ClipSpec(model="ViT-B-16-plus-240", weights=None, cpu_int8=kind.endswith("int8"))
    score = ZeroShotImageScore()
    if kind == "fade":  # the preset's own settings, with random weights
        spec = load_spec(os.path.join(os.path.dirname(__file__), "..", "jobs", "fade.yaml"),
                         ["clip.weights=null", "allow_random_weights=true"])
        clip, score, pixel = spec.clip, spec.score, spec.pixel
    stage = ClipScoreStage(clip, score, pixel=pixel, maps=MapOutputSpec(map_size=240))
    stage.setup()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (240, 240, 3), dtype=np.uint8) for _ in range(n_images + 1)]
    stage.text_classifier("object")
    if kind == "fade":
        stage.pixel_text_classifier()
    base_rss = rss_mb()
    times = []
    for i, img in enumerate(images):
        t0 = time.perf_counter()
        with torch.inference_mode():
            if kind.startswith("gem"):
                size = int(kind[3:])
                x = clip_models.preprocess_images(
                    [torch.from_numpy(img)],
                    clip_models.Preprocess(size, stage.preprocess.mean, stage.preprocess.std, "pil"),
                )
                vit.gem_forward(stage.model.visual, x, 6)
            else:
                stage.score_images([img], ["object"])
        if i:  # the first image is a warm-up
            times.append(time.perf_counter() - t0)
    extra = {}
    peak = rss_mb()  # before any reference model below
    if kind == "winclip_int8":  # deviation of the int8 mode from fp32 on the same images
        ref = ClipScoreStage(
            ClipSpec(model="ViT-B-16-plus-240", weights=None),
            ZeroShotImageScore(),
            pixel=pixel,
            maps=MapOutputSpec(map_size=240),
        )
        ref.setup()
        a = stage.score_images(images[1:], ["object"] * n_images)
        b = ref.score_images(images[1:], ["object"] * n_images)
        extra = {
            "max_abs_score_deviation": float(np.abs(a["score"] - b["score"]).max()),
            "max_abs_map_deviation": float(max(np.abs(x - y).max() for x, y in zip(a["maps"], b["maps"]))),
        }
    return {
        **extra,
        "kind": kind,
        "images": n_images,
        "threads": threads,
        "seconds_per_image_min": round(min(times), 3),
        "seconds_per_image_median": round(sorted(times)[len(times) // 2], 3),
        "rss_after_setup_mb": round(base_rss, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_rss_increase_mb": round(peak - base_rss, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(KINDS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.images, args.threads)))
        return
    rows = []
    for kind in args.only.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--one", kind, "--images", str(args.images), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{kind} failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| measurement | s/image (min) | s/image (median) | RSS after setup (MB) | peak RSS (MB) | "
        "peak - setup (MB) | deviation from fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        dev = (
            f"score {r['max_abs_score_deviation']:.2e}, map {r['max_abs_map_deviation']:.2e}"
            if "max_abs_score_deviation" in r
            else ""
        )
        print(
            f"| {r['kind']} | {r['seconds_per_image_min']} | {r['seconds_per_image_median']} | "
            f"{r['rss_after_setup_mb']} | {r['peak_rss_mb']} | {r['peak_rss_increase_mb']} | {dev} |"
        )


if __name__ == "__main__":
    main()
