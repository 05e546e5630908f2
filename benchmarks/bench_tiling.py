"""Tiles per image on the generated multi-instance set, and the time of the CPU stages around them.

Generates ``--images`` multi-instance images (pipeline.synthetic.make_multi_instance_dataset,
``--size`` H W, 2-5 objects each), runs the foreground stage (``--kind classical`` by default: no SAM,
deterministic) and the tiling stage with the given ``--min-tile``, and reports the distribution of
tiles per image, components per image, how many tiles were clipped, and the per-image time of the
foreground and tiling stages. No model weights are involved for ``classical``.

    .venv/bin/python benchmarks/bench_tiling.py [--images 40] [--size 768 1024] [--min-tile 352]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from pipeline.config import ForegroundSpec, TilingSpec  # noqa: E402
from pipeline.stages.foreground import ForegroundStage  # noqa: E402
from pipeline.stages.tiling import TilingStage  # noqa: E402
from pipeline.synthetic import make_multi_instance_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--size", type=int, nargs=2, default=(768, 1024), metavar=("H", "W"))
    ap.add_argument("--min-tile", type=int, default=352)
    ap.add_argument("--kind", default="classical", choices=("classical",))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        half = args.images // 2
        info = make_multi_instance_dataset(
            tmp, n_good=args.images - half, n_bad=half, size=tuple(args.size), seed=args.seed
        )
        images = [np.asarray(Image.open(Path(info["root"]) / im["path"]).convert("RGB")) for im in info["images"]]
    fg = ForegroundStage(ForegroundSpec(kind=args.kind))
    tiling = TilingStage(TilingSpec(min_tile=args.min_tile))
    per_tiles, per_comps, fg_ms, tile_ms, reasons, found = [], [], [], [], collections.Counter(), 0
    for img, meta in zip(images, info["images"]):
        t0 = time.perf_counter()
        _, comps, _, _ = fg.foreground(img)
        t1 = time.perf_counter()
        plan = tiling.plan(comps, img.shape[0], img.shape[1])
        t2 = time.perf_counter()
        fg_ms.append((t1 - t0) * 1000)
        tile_ms.append((t2 - t1) * 1000)
        per_tiles.append(len(plan))
        per_comps.append(len(comps))
        found += int(len(comps) == meta["n_instances"])
        reasons.update(t.reason for t in plan)
    tiles = np.array(per_tiles)
    print(
        f"| {dt.date.today()} | {cpu_name()}, {len(__import__('os').sched_getaffinity(0))} cores | "
        f"`python benchmarks/bench_tiling.py --images {args.images} --size {args.size[0]} {args.size[1]} "
        f"--min-tile {args.min_tile}` | "
        f"{args.kind} | {len(images)} | {np.mean(per_comps):.2f} | {found}/{len(images)} | "
        f"{tiles.mean():.2f} (min {tiles.min()}, median {np.median(tiles):.0f}, max {tiles.max()}) | "
        f"{dict(reasons)} | {np.median(fg_ms):.0f} | {np.median(tile_ms):.2f} |"
    )


if __name__ == "__main__":
    main()
