"""RsCIN as the run computes it (issue 28): per-category Ray tasks with side tables, then per-shard
rewrite tasks (pipeline.runtime.rescore.run), on N synthetic 768-d unit embeddings in ONE category,
with 1 and 2 workers.

For each N (default 10,000 and 100,000) the input is generated once, in a child process (so the
driver's peak is the pass alone): scores shards and embeddings shards of 1,000 rows each, as a run
writes them (the scores and embeddings contracts), random unit embeddings with some structure (a few
hundred clusters) and uniform raw scores. Then for each worker count W (default 1 and 2) a local Ray
is started with W CPUs (the tasks ask for 1 CPU each, so W run at once) and the pass runs with
``mutual.rscin_chunk`` = --chunk (default N / 4: four query-chunk tasks, each an exact k-NN of its
rows against the whole category). Reported per (N, W): wall seconds of the whole pass, of the
per-category tasks, the driver's peak RSS (VmHWM of this process, the pass only) and the largest
task worker's peak RSS (ru_maxrss reported by the tasks). The values of W = 1 and W = 2 are checked
equal.

Usage:
  .venv/bin/python benchmarks/bench_rscin.py [--sizes 10000 100000] [--workers 1 2] [--chunk ROWS]
      [--keep DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from _machine import cpu_name  # benchmarks/ is on sys.path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARD = 1000


def generate(n: int, folder: str, dim: int = 768, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io import contracts

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(8, n // 300), dim)).astype(np.float32)
    os.makedirs(os.path.join(folder, "scores"), exist_ok=True)
    os.makedirs(os.path.join(folder, "embeddings"), exist_ok=True)
    sc, em = contracts.load("scores"), contracts.load("embeddings")
    for k, i0 in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - i0)
        ids = [f"img{i:07d}" for i in range(i0, i0 + m)]
        e = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.normal(size=(m, dim)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        raw = rng.uniform(0.1, 1.5, m)
        cols = {f.name: [None] * m for f in sc.schema}
        cols.update(run_id=["bench"] * m, image_id=ids, uri=[f"/x/{i}.png" for i in ids], category=["c"] * m,
                    status=["ok"] * m, score=raw.tolist(), score_mutual=raw.tolist(), scoring_mode=["whole_image"] * m,
                    score_method=["mutual"] * m, pixel_method=["mutual"] * m, prompt_set=["none"] * m,
                    clip_model=["bench"] * m, clip_weights=["random"] * m, random_weights=[True] * m)
        pq.write_table(pa.table(cols, schema=sc.schema), os.path.join(folder, "scores", f"shard-{k:05d}.parquet"))
        flat = pa.array(e.reshape(-1), pa.float32())
        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (m + 1) * dim, dim, dtype=np.int32)), flat)
        pq.write_table(
            pa.table(
                {"run_id": ["bench"] * m, "image_id": ids, "category": ["c"] * m, "image_embedding": emb},
                schema=em.schema,
            ),
            os.path.join(folder, "embeddings", f"shard-{k:05d}.parquet"),
        )


def _hwm_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measured_category_values(**kwargs):
    """The pass's own per-category task, reporting the worker's peak RSS."""
    from pipeline.runtime.rescore import category_values

    out = category_values(**kwargs)
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_once(folder: str, n: int, workers: int, chunk: int) -> dict:
    import ray

    from pipeline.runtime import rescore
    from pipeline.runtime.executors import run_tasks

    run_dir = os.path.join(folder, f"run-w{workers}")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(os.path.join(folder, "scores"), os.path.join(run_dir, "scores"))
    scores = sorted(os.path.join(run_dir, "scores", f) for f in os.listdir(os.path.join(run_dir, "scores")))
    embeddings = sorted(os.path.join(folder, "embeddings", f) for f in os.listdir(os.path.join(folder, "embeddings")))
    # the workers import this module (measured_category_values) and the package as the driver does
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), ROOT, os.environ.get("PYTHONPATH", "")]
    )
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        session = {"executor": "ray"}
        job = rescore.Rescore("rscin", "score_rscin", also_score=True, k_list=(1, 2, 3), chunk=chunk)
        # warm the workers' imports outside the timed part (torch in each worker)
        ray.get(
            [ray.remote(num_cpus=1)(lambda: __import__("torch").zeros(1).sum().item()).remote() for _ in range(workers)]
        )
        t0 = time.monotonic()
        firsts = list(range(0, n, chunk))
        calls = [
            {
                "rescore": job,
                "category": "c",
                "first": f,
                "last": f + chunk,
                "score_files": scores,
                "embedding_files": embeddings,
                "run_dir": run_dir,
                "storage": None,
            }
            for f in firsts
        ]
        tasks = run_tasks(measured_category_values, calls, session, lambda m: None, "rscin")
        t1 = time.monotonic()
        sides = {"c": [rescore.side_uri(run_dir, "rscin", "c", f) for f in firsts]}
        run_tasks(
            rescore.rewrite_shard,
            [{"rescore": job, "score_uri": u, "sides": sides, "storage": None} for u in scores],
            session,
            lambda m: None,
            "rewrite",
        )
        t2 = time.monotonic()
    finally:
        ray.shutdown()
    import pyarrow.parquet as pq

    values = np.concatenate([pq.read_table(u, columns=["score_rscin"]).column(0).to_numpy() for u in scores])
    return {
        "n": n,
        "workers": workers,
        "chunk": chunk,
        "tasks": len(calls),
        "wall_s": round(t2 - t0, 2),
        "category_tasks_s": round(t1 - t0, 2),
        "rewrite_s": round(t2 - t1, 2),
        "driver_peak_mib": round(_hwm_mib(), 1),
        "worker_peak_mib": round(max(r["peak_mib"] for r in tasks), 1),
        "values": values,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk", type=int, default=None, help="rscin_chunk (default N / 4)")
    ap.add_argument("--keep", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--generate", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(int(args.generate[0]), args.generate[1])
        return
    base = args.keep or tempfile.mkdtemp(prefix="bench-rscin-")
    rows = []
    print(f"# RsCIN pass, {dt.date.today()}, {cpu_name()} ({os.cpu_count()} cores), Python {platform.python_version()}")
    for n in args.sizes:
        folder = os.path.join(base, f"n{n}")
        if not os.path.exists(os.path.join(folder, "embeddings")):
            subprocess.run([sys.executable, __file__, "--generate", str(n), folder], check=True)
        chunk = args.chunk or max(1, -(-n // 4))
        per_n = []
        for w in args.workers:
            # each worker count in its own process: the driver's peak is that run's alone
            out = os.path.join(folder, f"result-w{w}.npz")
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import sys; sys.path[:0]=[{os.path.dirname(__file__)!r}, {ROOT!r}]; "
                    f"import bench_rscin as b, json, numpy as np; r = b.run_once({folder!r}, {n}, {w}, {chunk}); "
                    f"np.save({out!r}.replace('.npz', '.npy'), r.pop('values')); print(json.dumps(r))",
                ],
                check=True,
                stdout=open(os.path.join(folder, f"result-w{w}.json"), "w"),
            )
            r = json.load(open(os.path.join(folder, f"result-w{w}.json")))
            r["values"] = np.load(out.replace(".npz", ".npy"))
            per_n.append(r)
        for r in per_n[1:]:
            np.testing.assert_array_equal(r["values"], per_n[0]["values"])
        for r in per_n:
            r.pop("values")
            rows.append(r)
    print(
        "| images | workers | tasks (rows each) | pass wall s | per-category tasks s | shard rewrite s | "
        "driver peak MiB | largest worker peak MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['workers']} | {r['tasks']} ({r['chunk']:,}) | {r['wall_s']} | "
            f"{r['category_tasks_s']} | {r['rewrite_s']} | {r['driver_peak_mib']} | {r['worker_peak_mib']} |"
        )
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
