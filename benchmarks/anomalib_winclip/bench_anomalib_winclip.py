"""CPU baseline: anomalib 2.7's WinCLIP zero-shot model (WinClipModel), 240x240 images.

Runs INSIDE the isolated venv made by setup_env.sh (<repo>/.venv-anomalib), never in the
project's .venv:

    .venv-anomalib/bin/python benchmarks/anomalib_winclip/bench_anomalib_winclip.py

RANDOM WEIGHTS, TIMING ONLY. anomalib's WinClipModel calls
``open_clip.create_model_and_transforms("ViT-B-16-plus-240", pretrained="laion400m_e31")``, which
downloads weights from a model hub; these machines cannot reach one. In THIS process only,
``open_clip.create_model_and_transforms`` is wrapped so that it is called with ``pretrained=None``
(same architecture, random init, seeded with ``torch.manual_seed``). Nothing else in anomalib or
open_clip is changed. Speed and memory do not depend on the weight values; the scores do, so the
scores printed here mean nothing and are reported only as a determinism checksum.

What is timed (torch.set_num_threads(2): the benchmark machines have 2 cores):
  * import of anomalib's WinClipModel (one-off, reported);
  * model build: WinClipModel(class_name=None) = open_clip model creation (random init) + masks;
  * zero-shot setup: model.setup("object"), the prompt-ensemble text embeddings, computed once
    (reported separately and excluded from the per-image figures);
  * per image: model(batch) with batch size 1, i.e. what anomalib's WinClip.validation_step /
    predict does per batch (image embedding + window embeddings at scales (2, 3) + zero-shot
    scores + bilinear anomaly map at 240x240). Returns InferenceBatch(pred_score, anomaly_map).
    Inputs go through anomalib's own WinClip pre-processor transform (Resize 240 + CLIP
    Normalize) beforehand, outside the timed region (it is a no-op resize and a normalize).
    One warm-up image is run first and excluded; min / median over the N timed images.
  * optionally (--batch8) one warm-up plus --batch8-repeats timed forward passes on a batch of 8.
  * peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss, and its increase over the RSS measured
    after imports and before the model is built.

--check-collapse reports, per window scale, the spread of the window embeddings across windows
of the same image (std across windows of the L2-normalised embeddings, averaged over dims, and
the mean pairwise cosine similarity). With open_clip < 2.26 (sequence-first transformer) the
windows should differ; the claim being checked is that with open_clip >= 2.26/3.x, where
anomalib's permute(1, 0, 2) no longer matches the transformer's layout, they collapse.

Output: a human-readable summary on stderr-free stdout, then one JSON line prefixed ``JSON: ``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared _machine helper
from _machine import cpu_name  # noqa: E402


def rss_now_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def synthetic_images(n: int, size: int, seed: int):
    """Deterministic RGB images in [0, 1], shape (n, 3, size, size): smooth gradients and
    sinusoidal texture, plus a small bright square 'defect' on odd-numbered images."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, size).view(size, 1).expand(size, size)
    xs = torch.linspace(0, 1, size).view(1, size).expand(size, size)
    out = []
    for i in range(n):
        freq = 2.0 + 6.0 * torch.rand(3, generator=g)
        phase = 6.283 * torch.rand(3, generator=g)
        chans = [
            0.5 + 0.25 * torch.sin(freq[c] * 6.283 * (xs * (c + 1) + ys) + phase[c]) + 0.2 * (xs - ys)
            for c in range(3)
        ]
        img = torch.stack(chans)
        img = img + 0.05 * torch.randn(3, size, size, generator=g)
        if i % 2 == 1:
            y0, x0 = (int(v) for v in torch.randint(0, size - 24, (2,), generator=g))
            img[:, y0 : y0 + 24, x0 : x0 + 24] = 1.0
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def patch_weight_loading() -> dict:
    """Make open_clip.create_model_and_transforms ignore `pretrained` (random init) in this
    process. anomalib's torch_model calls it as `open_clip.create_model_and_transforms(...)`
    through the module attribute, so patching the attribute on the open_clip module suffices."""
    import open_clip

    original = open_clip.create_model_and_transforms
    calls: dict = {"requested_pretrained": []}

    def create_model_and_transforms_random(model_name, pretrained=None, *args, **kwargs):
        calls["requested_pretrained"].append(pretrained)
        return original(model_name, *args, pretrained=None, **kwargs)

    open_clip.create_model_and_transforms = create_model_and_transforms_random
    return calls


def collapse_stats(window_embeddings) -> list[dict]:
    import torch

    stats = []
    for scale_idx, emb in enumerate(window_embeddings):  # emb: (B, W, D)
        e = torch.nn.functional.normalize(emb[0].float(), dim=-1)  # first image, (W, D)
        w = e.shape[0]
        sim = e @ e.T
        off_diag = sim[~torch.eye(w, dtype=torch.bool)]
        raw = emb[0].float()
        stats.append(
            {
                "scale_index": scale_idx,
                "n_windows": int(w),
                "dim": int(e.shape[1]),
                "std_across_windows_normalised": float(e.std(dim=0).mean()),
                "std_across_windows_raw": float(raw.std(dim=0).mean()),
                "raw_embedding_norm_mean": float(raw.norm(dim=-1).mean()),
                "mean_pairwise_cosine": float(off_diag.mean()),
                "min_pairwise_cosine": float(off_diag.min()),
            }
        )
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8, help="timed images at batch size 1 (after 1 warm-up)")
    ap.add_argument("--size", type=int, default=240)
    ap.add_argument("--class-name", default="object")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch8", action="store_true", help="also time forward passes on a batch of 8")
    ap.add_argument("--batch8-repeats", type=int, default=2)
    ap.add_argument("--check-collapse", action="store_true")
    args = ap.parse_args()

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    calls = patch_weight_loading()
    from importlib.metadata import version

    from anomalib.models.image.winclip.lightning_model import WinClip
    from anomalib.models.image.winclip.torch_model import WinClipModel

    import_s = time.perf_counter() - t0

    # inputs, pre-processed with anomalib's own WinClip pre-processor transform (outside timing)
    transform = WinClip.configure_pre_processor().transform
    n_total = 1 + args.images
    raw = synthetic_images(max(n_total, 8), args.size, args.seed)
    images = torch.stack([transform(img) for img in raw])

    rss_baseline = rss_now_kib()
    peak_before_model = peak_rss_kib()

    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model = WinClipModel(class_name=None, apply_transform=False)  # anomalib's lightning WinClip does the same
    model.eval()
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    c = time.process_time()
    model.setup(args.class_name)
    setup_s = time.perf_counter() - t
    setup_cpu_s = time.process_time() - c
    rss_after_setup = rss_now_kib()

    # batch size 1: 1 warm-up + N timed
    wall, cpu, scores = [], [], []
    for i in range(n_total):
        x = images[i : i + 1]
        t = time.perf_counter()
        c = time.process_time()
        out = model(x)
        dt_wall = time.perf_counter() - t
        dt_cpu = time.process_time() - c
        assert tuple(out.anomaly_map.shape) == (1, args.size, args.size), out.anomaly_map.shape
        if i == 0:
            warmup_s = dt_wall
            continue
        wall.append(dt_wall)
        cpu.append(dt_cpu)
        scores.append(float(out.pred_score[0]))

    batch8 = None
    if args.batch8:
        x8 = images[:8]
        model(x8)  # warm-up
        b_wall = []
        for _ in range(args.batch8_repeats):
            t = time.perf_counter()
            out8 = model(x8)
            b_wall.append(time.perf_counter() - t)
        assert tuple(out8.anomaly_map.shape) == (8, args.size, args.size)
        batch8 = {
            "repeats": args.batch8_repeats,
            "batch_s": b_wall,
            "per_image_s_min": min(b_wall) / 8,
            "per_image_s_median": statistics.median(b_wall) / 8,
        }

    collapse = None
    if args.check_collapse:
        with torch.no_grad():
            _, window_embeddings, _ = model.encode_image(images[:1])
        collapse = collapse_stats(window_embeddings)

    peak = peak_rss_kib()
    result = {
        "bench": "anomalib_winclip_zero_shot_cpu",
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "random_weights": True,
        "weight_loading_patched": "open_clip.create_model_and_transforms(pretrained=None)",
        "pretrained_requested_by_anomalib": calls["requested_pretrained"],
        "backbone": model.backbone,
        "versions": {
            "python": platform.python_version(),
            "anomalib": version("anomalib"),
            "open_clip_torch": version("open_clip_torch"),
            "torch": torch.__version__,
            "torchvision": version("torchvision"),
        },
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_name(), "platform": platform.platform()},
        "torch_threads": torch.get_num_threads(),
        "image_size": args.size,
        "class_name": args.class_name,
        "n_timed_images": args.images,
        "import_s": import_s,
        "model_build_s": build_s,
        "zero_shot_setup_s": setup_s,
        "zero_shot_setup_cpu_s": setup_cpu_s,
        "warmup_image_s": warmup_s,
        "per_image_s": wall,
        "per_image_s_min": min(wall),
        "per_image_s_median": statistics.median(wall),
        "per_image_cpu_s_median": statistics.median(cpu),
        "cpu_over_wall_per_image": sum(cpu) / sum(wall),
        "batch8": batch8,
        "rss_baseline_mib": rss_baseline / 1024,
        "rss_after_setup_mib": rss_after_setup / 1024,
        "peak_rss_before_model_mib": peak_before_model / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_rss_increase_over_baseline_mib": (peak - rss_baseline) / 1024,
        "pred_score_checksum": sum(scores),
        "collapse_check": collapse,
        "loadavg_1_5_15_start": list(load_start),
        "loadavg_1_5_15_end": list(os.getloadavg()),
        "argv": sys.argv,
    }

    v = result["versions"]
    print("anomalib WinCLIP zero-shot, CPU, RANDOM WEIGHTS (timing only, scores meaningless)")
    print(
        f"  versions: python {v['python']}, anomalib {v['anomalib']}, open_clip_torch {v['open_clip_torch']}, "
        f"torch {v['torch']}, torchvision {v['torchvision']}"
    )
    print(
        f"  machine: {result['machine']['nproc']} CPUs ({result['machine']['cpu']}); "
        f"torch threads = {result['torch_threads']} (torch.set_num_threads({args.threads}))"
    )
    print(
        f"  import {import_s:.1f} s | model build (random init) {build_s:.1f} s | "
        f"zero-shot setup ('{args.class_name}' text embeddings) {setup_s:.1f} s wall, {setup_cpu_s:.1f} s CPU"
    )
    print(
        f"  batch 1, {args.size}x{args.size}: warm-up {warmup_s:.2f} s; per image over {len(wall)} images: "
        f"min {min(wall):.2f} s, median {statistics.median(wall):.2f} s "
        f"(process CPU median {statistics.median(cpu):.2f} s)"
    )
    if batch8:
        print(
            f"  batch 8: per image min {batch8['per_image_s_min']:.2f} s, median {batch8['per_image_s_median']:.2f} s "
            f"({batch8['repeats']} timed batches)"
        )
    print(
        f"  process CPU / wall over timed images: {result['cpu_over_wall_per_image']:.2f} (2.0 = both threads busy); "
        f"load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
        "(machine shared: other work inflates timings)"
    )
    print(
        f"  RSS: baseline (after imports, before model) {rss_baseline / 1024:.0f} MiB; "
        f"after setup {rss_after_setup / 1024:.0f} MiB; peak (ru_maxrss) {peak / 1024:.0f} MiB; "
        f"peak - baseline {(peak - rss_baseline) / 1024:.0f} MiB"
    )
    if collapse:
        for s in collapse:
            print(
                f"  collapse check, scale #{s['scale_index']} ({s['n_windows']} windows): std across windows "
                f"(L2-normalised, mean over dims) {s['std_across_windows_normalised']:.4g}; mean pairwise cosine "
                f"{s['mean_pairwise_cosine']:.6f} (min {s['min_pairwise_cosine']:.6f})"
            )
    print(f"  pred_score checksum (determinism only): {result['pred_score_checksum']:.6f}")
    print("JSON: " + json.dumps(result))


if __name__ == "__main__":
    main()
