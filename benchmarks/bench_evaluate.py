"""`zsad evaluate` on one generated category of N images at S x S (default 300 x 1024 x 1024,
about 3e8 pixels): wall time, pixels/s per core, and peak memory.

The run folder is synthesised (no CLIP): random smooth 16-bit heatmaps in `masks/`, labels and
ground-truth masks (0/255 PNGs) in `inputs.parquet`, scores in `scores/`. Then `zsad evaluate RUN`
runs as a user would (local Ray). Memory is sampled from /proc every 0.2 s over the CLI process and
every Ray process (driver, workers, raylet, GCS); reported: the peak of the CLI driver, the peak of
the largest single worker, and the peak of the sum over all of them.

Usage: python benchmarks/bench_evaluate.py [--images 300] [--size 1024] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def make_run(root: str, n: int, size: int) -> str:
    import pandas as pd

    from pipeline.io.manifest import image_id_for, write_manifest
    from pipeline.ops import heatmap

    run = os.path.join(root, "out", "bench")
    os.makedirs(os.path.join(run, "masks"), exist_ok=True)
    os.makedirs(os.path.join(run, "scores"), exist_ok=True)
    os.makedirs(os.path.join(root, "gt"), exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.random((size // 32, size // 32))
    rows, mrows = [], []
    for i in range(n):
        uri = os.path.join(root, "images", f"img_{i:04d}.png")
        iid = image_id_for(uri)
        label = int(i % 2)
        small = np.roll(base, i, axis=0) * 0.5 + rng.random(base.shape) * 0.2
        m = (
            np.asarray(Image.fromarray((small * 65535).astype(np.uint16)).resize((size, size), Image.BILINEAR))
            / 65535.0
        )
        mask_uri = None
        if label:
            mask = np.zeros((size, size), np.uint8)
            r, c = rng.integers(0, size - 200, 2)
            mask[r : r + rng.integers(20, 200), c : c + rng.integers(20, 200)] = 255
            mask_uri = os.path.join(root, "gt", f"img_{i:04d}_mask.png")
            Image.fromarray(mask).save(mask_uri)
            m = np.clip(m + (mask > 0) * 0.3, 0, 1)
        mrows.append(
            {"image_id": iid, "category": "bench", "status": "ok", "map_png": heatmap.encode_png16(m, 0.0, 1.0)}
        )
        rows.append(
            {
                "uri": uri,
                "image_id": iid,
                "category": "bench",
                "gt_label": label,
                "mask_uri": mask_uri,
                "size": None,
                "mtime": None,
                "etag": None,
                "score": float(m.max()),
            }
        )
    df = pd.DataFrame(rows)
    df["gt_label"] = df["gt_label"].astype("Int64")
    df["size"] = pd.array([None] * n, dtype="Int64")
    df["mtime"] = pd.array([None] * n, dtype="Float64")
    write_manifest(df.drop(columns=["score"]), os.path.join(run, "inputs.parquet"))
    pq.write_table(
        pa.table(
            {
                "image_id": df["image_id"],
                "category": df["category"],
                "status": ["ok"] * n,
                "score": df["score"],
                "max_pixel_score": df["score"],
            }
        ),
        os.path.join(run, "scores", "part-00000.parquet"),
    )
    for k in range(0, n, 50):  # masks part files of 50 rows: one evaluation task each
        pq.write_table(
            pa.Table.from_pylist(mrows[k : k + 50]), os.path.join(run, "masks", f"part-{k // 50:05d}.parquet")
        )
    with open(os.path.join(run, "run.json"), "w") as fh:
        json.dump(
            {"run_id": "bench", "status": "succeeded", "random_weights": True, "model": {"pixel_method": "synthetic"}},
            fh,
        )
    return run


def _rss_kb(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--keep")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="zsad-bench-eval-")
    t0 = time.perf_counter()
    run = make_run(root, args.images, args.size)
    gen_s = time.perf_counter() - t0

    peaks = {"driver": 0, "worker_max": 0, "total": 0}
    stop = threading.Event()
    zsad = os.path.join(os.path.dirname(sys.executable), "zsad")
    proc = subprocess.Popen([zsad, "evaluate", run], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample() -> None:
        while not stop.is_set():
            total = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                cmd = _cmdline(pid)
                if pid == str(proc.pid):
                    rss = _rss_kb(pid)
                    peaks["driver"] = max(peaks["driver"], rss)
                    total += rss
                elif (
                    "ray::" in cmd
                    or "raylet" in cmd
                    or "gcs_server" in cmd
                    or "ray/_private" in cmd
                    or "dashboard" in cmd
                ):
                    rss = _rss_kb(pid)
                    if "ray::" in cmd:
                        peaks["worker_max"] = max(peaks["worker_max"], rss)
                    total += rss
            peaks["total"] = max(peaks["total"], total)
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    t1 = time.perf_counter()
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t1
    stop.set()
    th.join()
    if proc.returncode:
        print(out[-3000:])
        raise SystemExit("evaluate failed")
    pixels = args.images * args.size * args.size
    record = {
        "date": dt.date.today().isoformat(),
        "images": args.images,
        "size": args.size,
        "pixels": pixels,
        "cores": os.cpu_count(),
        "generate_s": round(gen_s, 1),
        "evaluate_wall_s": round(wall, 1),
        "pixels_per_s_per_core": round(pixels / wall / (os.cpu_count() or 1)),
        "peak_rss_driver_mb": round(peaks["driver"] / 1024),
        "peak_rss_largest_worker_mb": round(peaks["worker_max"] / 1024),
        "peak_rss_all_processes_mb": round(peaks["total"] / 1024),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
