"""Per-image time and peak RSS of SAM automatic mask generation (embed once, decode a point grid).

Model: a segment-anything architecture (default ``vit_b``) with RANDOM weights unless
``--checkpoint`` is given (the real checkpoints cannot be downloaded on the benchmark machines;
time and memory of the encoder do not depend on the weight values; no mask quality is measured).
Images: generated multi-object RGB scenes (default 3 of 640 x 480).

For each image the encoder runs once (``embed``), then ``automatic_masks`` decodes the
points_per_side^2 grid against that embedding for each requested ``--points-per-side`` (default 32,
SAM's default, and 16). Reported per image: embed seconds, decode seconds (prompt encoder + mask
decoder + upscaling, stability scores, NMS, records) and peak RSS (VmHWM from /proc/self/status,
reset before each phase through /proc/self/clear_refs where the kernel allows it).

Thresholds: by default the IoU and stability filters are OFF (0). With random weights SAM's
defaults (0.88 / 0.95) drop every mask before upscaling, which would time only the decoder; with
the filters off every mask is upscaled and scored, an upper bound for real weights. Pass
``--pred-iou-thresh 0.88 --stability-score-thresh 0.95`` for SAM's settings.

Usage: python benchmarks/bench_sam.py [--model vit_b] [--images 3] [--points-per-side 32 16]
       [--size 640x480] [--points-per-batch 64] [--checkpoint FILE] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time

import numpy as np
from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def peak_rss_mb() -> float | None:
    """VmHWM (peak resident set size) of this process in MiB, None where /proc is not available."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def scene(height: int, width: int, seed: int) -> np.ndarray:
    """A synthetic (H, W, 3) uint8 scene: a shaded noisy background and 6-10 rectangles and
    ellipses of random colours and sizes (some overlapping)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    base = 90 + 50 * (xx / width) + 30 * (yy / height)
    img = np.clip(base[..., None] + rng.normal(0, 8, (height, width, 3)), 0, 255)
    for _ in range(int(rng.integers(6, 11))):
        colour = rng.integers(0, 256, 3)
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        rx, ry = rng.uniform(0.04, 0.2) * width, rng.uniform(0.04, 0.2) * height
        if rng.random() < 0.5:
            inside = (np.abs(xx - cx) < rx) & (np.abs(yy - cy) < ry)
        else:
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1.0
        img[inside] = colour
    return img.astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b", help="vit_h, vit_l, vit_b or tiny (default vit_b)")
    ap.add_argument("--checkpoint", default=None, help="local SAM state dict (default: random weights)")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the generated images")
    ap.add_argument("--points-per-side", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.0)
    ap.add_argument("--stability-score-thresh", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    import torch

    from pipeline.models.sam import SamEngine, build_sam

    cuda = torch.device(args.device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    sam = build_sam(args.model, args.checkpoint, device=args.device)
    build_s = time.perf_counter() - t0
    engine = SamEngine(sam)
    n_params = sum(p.numel() for p in sam.parameters())
    images = [scene(height, width, seed) for seed in range(args.images)]

    embed_s, embed_rss = [], []
    decode: dict[int, dict[str, list[float]]] = {p: {"s": [], "rss": [], "masks": []} for p in args.points_per_side}
    resettable = reset_peak_rss()
    for img in images:
        reset_peak_rss()
        sync()
        t = time.perf_counter()
        emb = engine.embed(img)
        sync()
        embed_s.append(time.perf_counter() - t)
        embed_rss.append(peak_rss_mb() or float("nan"))
        for pps in args.points_per_side:
            reset_peak_rss()
            sync()
            t = time.perf_counter()
            records = engine.automatic_masks(
                emb,
                points_per_side=pps,
                points_per_batch=args.points_per_batch,
                pred_iou_thresh=args.pred_iou_thresh,
                stability_score_thresh=args.stability_score_thresh,
            )
            sync()
            decode[pps]["s"].append(time.perf_counter() - t)
            decode[pps]["rss"].append(peak_rss_mb() or float("nan"))
            decode[pps]["masks"].append(len(records))
        del emb

    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if cuda else "")
    )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    weights = args.checkpoint or "random weights"
    rows = []
    for pps in args.points_per_side:
        rec = {
            "date": dt.date.today().isoformat(),
            "machine": machine,
            "command": command,
            "model": args.model,
            "parameters_m": round(n_params / 1e6, 1),
            "weights": weights,
            "device": args.device,
            "images": args.images,
            "image_size": f"{width}x{height}",
            "points_per_side": pps,
            "points_per_batch": args.points_per_batch,
            "pred_iou_thresh": args.pred_iou_thresh,
            "stability_score_thresh": args.stability_score_thresh,
            "build_s": round(build_s, 2),
            "embed_s_per_image": round(float(np.mean(embed_s)), 3),
            "decode_s_per_image": round(float(np.mean(decode[pps]["s"])), 3),
            "total_s_per_image": round(float(np.mean(embed_s) + np.mean(decode[pps]["s"])), 3),
            "embed_s_each": [round(v, 3) for v in embed_s],
            "decode_s_each": [round(v, 3) for v in decode[pps]["s"]],
            "masks_per_image": float(np.mean(decode[pps]["masks"])),
            "peak_rss_mb_embed": round(max(embed_rss), 1),
            "peak_rss_mb_decode": round(max(decode[pps]["rss"]), 1),
            "peak_rss_reset_per_phase": resettable,
        }
        if cuda:
            rec["cuda_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rows.append(rec)
        print(json.dumps(rec))
    print()
    print(
        "| date | machine | command | model | images | points/side | embed s/img | decode s/img | total s/img | "
        "masks/img | peak RSS MiB (embed / decode) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['date']} | {r['machine']} | `{r['command']}` | {r['model']} ({r['parameters_m']}M, {r['weights']}, "
            f"{r['device']}) | {r['images']} x {r['image_size']} | {r['points_per_side']} | {r['embed_s_per_image']} | "
            f"{r['decode_s_per_image']} | {r['total_s_per_image']} | {r['masks_per_image']:g} | "
            f"{r['peak_rss_mb_embed']:.0f} / {r['peak_rss_mb_decode']:.0f} |"
        )


if __name__ == "__main__":
    main()
