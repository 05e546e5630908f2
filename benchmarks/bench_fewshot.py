"""Few-shot scoring on the REAL architectures (CPU): bank build time per reference image, the per-image
overhead of each few-shot scorer over its zero-shot method for k = 1, 4, 16, and the peak RSS of a
scoring process holding the bank.

Models: the presets' own (jobs/winclip_fewshot.yaml, jobs/fade_fewshot.yaml: ViT-B-16-plus-240;
jobs/aprilgan_fewshot.yaml: ViT-L-14-336 at 518 px with random adapters), all with RANDOM weights (the
pretrained ones cannot be downloaded on the benchmark machines; time and memory do not depend on the
weight values; no accuracy is measured or implied). Images: generated 256 x 256 RGB.

Phases, each in its own subprocess so that its peak RSS (ru_maxrss) is its own:
  build METHOD      the bank features of 16 reference images through the bank stage's code, one image at
                    a time (s per reference image); banks of the first 1, 4 and 16 written to a temp folder
  score METHOD K    a scoring stage (the pipeline's ClipScoreStage) scores --images images after one
                    warm-up: K = 0 is the zero-shot method, K > 0 reads the K-shot bank (exact search)

Usage: python benchmarks/bench_fewshot.py [--methods fade,winclip,april_gan] [--images 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {"winclip": "winclip_fewshot.yaml", "fade": "fade_fewshot.yaml", "april_gan": "aprilgan_fewshot.yaml"}
SHOTS = (1, 4, 16)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


BANK_CHUNK: list[str] = []  # --bank-chunk N: few_shot.bank_chunk for the scoring processes


def spec_for(method: str):
    from pipeline.config import load_spec

    sets = ["clip.weights=null", "allow_random_weights=true", "resources.clip_score.num_gpus=0", *BANK_CHUNK]
    if method == "april_gan":
        sets.append("pixel.weights=null")
    return load_spec(os.path.join(HERE, "..", "jobs", PRESETS[method]), sets)


def images(seed: int, n: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(n)]


def build(method: str, folder: str, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from pipeline.io.banks import write_bank
    from pipeline.stages.clip_score import ClipScoreStage

    stage = ClipScoreStage.from_spec(spec_for(method))
    stage.setup()
    refs = images(1, max(SHOTS) + 1)
    stage.bank_features(refs[:1])  # warm-up
    feats, times = [], []
    for img in refs[1:]:
        t0 = time.perf_counter()
        feats.append(stage.bank_features([img])[0])
        times.append(time.perf_counter() - t0)
    sizes = {}
    for k in SHOTS:
        tensors = {key: np.concatenate([f[key] for f in feats[:k]]) for key in feats[0]}
        sizes[k] = write_bank(
            os.path.join(folder, f"{method}-{k}.safetensors"), tensors, {"digest": f"bench-{k}", "k": k}
        )
    return {
        "phase": "build",
        "method": method,
        "reference_images": len(times),
        "seconds_per_reference_min": round(min(times), 3),
        "seconds_per_reference_median": round(sorted(times)[len(times) // 2], 3),
        "bank_mb": {k: round(v / 2**20, 1) for k, v in sizes.items()},
        "peak_rss_mb": round(rss_mb(), 1),
    }


def score(method: str, k: int, folder: str, n_images: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from pipeline.stages.clip_score import ClipScoreStage

    stage = ClipScoreStage.from_spec(spec_for(method))
    stage.setup()
    if k:
        stage.banks = {
            "object": {
                "uri": os.path.join(folder, f"{method}-{k}.safetensors"),
                "digest": f"bench-{k}",
                "k": k,
                "reference_digest": "bench",
            }
        }
    stage.text_classifier("object")
    if method == "fade":
        stage.pixel_text_classifier()
    setup_rss = rss_mb()
    times = []
    for i, img in enumerate(images(2, n_images + 1)):
        t0 = time.perf_counter()
        out = stage.score_images([img], ["object"])
        if i:
            times.append(time.perf_counter() - t0)
    assert out["few_shot_k"][0] == k, out["few_shot_k"]
    return {
        "phase": "score",
        "method": method,
        "k": k,
        "images": n_images,
        "seconds_per_image_min": round(min(times), 3),
        "seconds_per_image_median": round(sorted(times)[len(times) // 2], 3),
        "rss_after_setup_mb": round(setup_rss, 1),
        "peak_rss_mb": round(rss_mb(), 1),
    }


def child(args: list[str], threads: int, images_per_run: int) -> dict:
    extra = ["--bank-chunk", BANK_CHUNK[0].split("=")[1]] if BANK_CHUNK else []
    extra += ["--threads", str(threads), "--images", str(images_per_run)]
    out = subprocess.run(
        [sys.executable, __file__, *extra, "--one", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(args)} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="winclip,fade,april_gan")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bank-chunk", type=int, help="few_shot.bank_chunk (rows of the bank per similarity block)")
    ap.add_argument("--shots", default="1,4,16", help="k values scored (banks of 1, 4 and 16 are built)")
    ap.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot timing")
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bank_chunk:
        BANK_CHUNK.append(f"few_shot.bank_chunk={args.bank_chunk}")
    if args.one:
        phase, method, folder = args.one[0], args.one[1], args.one[-1]
        if phase == "build":
            print(json.dumps(build(method, folder, args.threads)))
        else:
            print(json.dumps(score(method, int(args.one[2]), folder, args.images, args.threads)))
        return
    from _machine import cpu_name

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, threads {args.threads}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods.split(","):
            built = child(["build", method, folder], args.threads, args.images)
            print(json.dumps(built), flush=True)
            runs = {}
            shots = [int(x) for x in args.shots.split(",")]
            for k in ([] if args.no_zero_shot else [0]) + shots:
                runs[k] = child(["score", method, str(k), folder], args.threads, args.images)
                print(json.dumps(runs[k]), flush=True)
            rows.append((method, built, runs))
    print(
        "\n| method | bank build s/reference (median) | zero-shot s/image | k | few-shot s/image | overhead s/image | "
        "bank MB | peak RSS scoring (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, built, runs in rows:
        zs = runs[0]["seconds_per_image_median"] if 0 in runs else float("nan")
        for k in (k for k in SHOTS if k in runs):
            r = runs[k]
            print(
                f"| {method} | {built['seconds_per_reference_median']} | {zs} | {k} | "
                f"{r['seconds_per_image_median']} | "
                f"{r['seconds_per_image_median'] - zs:+.3f} | {built['bank_mb'][str(k)]} | {r['peak_rss_mb']} |"
            )


if __name__ == "__main__":
    main()
