"""`zsad report` on a run of 100,000 images: time, file size and peak RSS, side by side with the same
report of a 1,000-image run (the report must not grow with the run).

A real tiny-model run (`jobs/smoke.yaml` on the generated dataset, maps stored at 256 px, threshold
masks) gives the rows; the big run folders are made from its tables by repeating its rows under new
image ids, URIs, categories and scores drawn at random (labelled, half anomalous), in shards of 1,000
rows with row groups of 16 rows, as `zsad run` writes them. The images are hard links to the real
run's image files and the heatmaps its PNG bytes, so every shown image goes through the same reading,
decoding and drawing as in a real run; only the values are made up (they are random-weight maps
anyway: nothing here is an accuracy).

Each report runs in its own process (its peak RSS is its own); the run folders are built first.

Usage: python benchmarks/bench_report.py [--images 1000,100000] [--categories 15] [--top 6] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def base_run(work: str) -> str:
    """A real tiny run with maps, threshold masks and labels."""
    from pipeline.synthetic import make_dataset

    data, out = os.path.join(work, "data"), os.path.join(work, "out")
    make_dataset(data, size=256)  # images of 256 px: thumbnails at the report's full size
    zsad = os.path.join(os.path.dirname(sys.executable), "zsad")
    subprocess.run(
        [
            zsad,
            "run",
            os.path.join(REPO, "jobs", "smoke.yaml"),
            "-i",
            data,
            "-o",
            out,
            "--run-id",
            "base",
            "-q",
            "--set",
            "maps.threshold=0.6",
            "--set",
            "report.enabled=false",
        ],
        check=True,
        cwd=REPO,
    )
    return os.path.join(out, "base")


def synthesize(base: str, dest: str, n: int, n_categories: int, seed: int = 0) -> None:
    """A run folder of ``n`` images made from ``base``'s rows (see the module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    tables = {t: pq.read_table(os.path.join(base, t)) for t in ("scores", "masks")}
    inputs = pq.read_table(os.path.join(base, "inputs.parquet"))
    m = tables["scores"].num_rows
    src = rng.integers(0, m, n)
    cats = np.array([f"cat{c:02d}" for c in rng.integers(0, n_categories, n)], dtype=object)
    labels = rng.integers(0, 2, n)
    score = np.clip(rng.normal(0.5 + 0.15 * labels, 0.12), 0, 1)
    img_dir = os.path.join(dest, "images")
    base_uris = tables["scores"].column("uri").to_pylist()
    uris = np.array([os.path.join(img_dir, str(cats[i]), f"{i:07d}.png") for i in range(n)], dtype=object)
    ids = np.array([f"{i:016x}" for i in range(n)], dtype=object)
    for c in np.unique(cats):
        os.makedirs(os.path.join(img_dir, str(c)), exist_ok=True)
    for i in range(n):
        os.link(base_uris[src[i]], uris[i])
    base_masks = {r["image_id"]: r for r in inputs.select(["image_id", "mask_uri"]).to_pylist()}
    mask_uri = np.array(
        [
            base_masks[tables["scores"].column("image_id")[int(s)].as_py()]["mask_uri"] if labels[i] else None
            for i, s in enumerate(src)
        ],
        dtype=object,
    )

    def replace(table, cols):
        for name, values in cols.items():
            if name in table.column_names:
                k = table.column_names.index(name)
                table = table.set_column(k, table.schema.field(k), pa.array(values, type=table.schema.field(k).type))
        return table

    for start in range(0, n, 1000):
        sl = slice(start, min(n, start + 1000))
        common = {"image_id": ids[sl], "uri": uris[sl], "category": cats[sl]}
        for t, table in tables.items():
            part = table.take(pa.array(src[sl]))
            extra = {"score": score[sl], "score_language": score[sl], "gt_label": labels[sl]} if t == "scores" else {}
            part = replace(part, {**common, **extra})
            os.makedirs(os.path.join(dest, t), exist_ok=True)
            pq.write_table(part, os.path.join(dest, t, f"shard-{start // 1000:05d}.parquet"), row_group_size=16)
    inp = replace(
        inputs.take(pa.array(src)),
        {"image_id": ids, "uri": uris, "category": cats, "gt_label": labels, "mask_uri": mask_uri},
    )
    pq.write_table(inp, os.path.join(dest, "inputs.parquet"))
    shutil.copytree(os.path.join(base, "errors"), os.path.join(dest, "errors"))
    with open(os.path.join(base, "run.json")) as fh:
        record = json.load(fh)
    record.update(
        run_id=os.path.basename(dest), counts={"images": n, "ok": n, "failed": 0, "missing": 0}, labelled_images=n
    )
    with open(os.path.join(dest, "run.json"), "w") as fh:
        json.dump(record, fh)


def report_child(run: str, top: int) -> None:
    from pipeline.report.report import build_report

    t = time.monotonic()
    result = build_report(run, top=top, log=lambda m: None)
    print(
        json.dumps(
            {
                "seconds": time.monotonic() - t,
                "mb": result.bytes / 1e6,
                "shown": result.images_shown,
                "categories": result.categories,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="1000,100000")
    ap.add_argument("--categories", type=int, default=15)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--child", nargs=2, metavar=("RUN", "TOP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        report_child(args.child[0], int(args.child[1]))
        return
    work = args.keep or tempfile.mkdtemp(prefix="zsad-bench-report-")
    try:
        base = base_run(work)
        sizes = [int(s) for s in args.images.split(",")]
        runs = {}
        for n in sizes:
            t = time.monotonic()
            runs[n] = os.path.join(work, f"run-{n}")
            synthesize(base, runs[n], n, args.categories)
            print(f"built a {n}-image run folder in {time.monotonic() - t:.0f} s", file=sys.stderr)
        from _machine import cpu_name

        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {args.categories} categories; --top {args.top}")
        print("| images | report s | report MB | images shown | peak RSS MB |")
        print("|---|---|---|---|---|")
        for n in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--child", runs[n], str(args.top)],
                check=True,
                capture_output=True,
                text=True,
                cwd=HERE,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {n:,} | {r['seconds']:.1f} | {r['mb']:.2f} | {r['shown']} | {r['rss_mb']:.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
