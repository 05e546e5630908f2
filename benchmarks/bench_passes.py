"""Mutual scoring's passes over whole categories: driver and actor peak memory as the number of
categories grows (issue 28).

For each C in --categories (default 1, 6, 15), an input of C categories of --images (default 40)
small synthetic RGB PNGs each (default 96 x 96, from tests.helpers.badfiles.write_good_images, one
seed range per category; generated once, outside the timed part, and hard-linked into one
`folder`-layout input per C: INPUT/<category>/<image>.png) is scored by

    zsad run jobs/musc.yaml --input DIR --output OUT --layout folder --no-evaluate --run-id ID
        --set clip.model=ViT-B-16 --set clip.weights=null --set allow_random_weights=true
        --set pixel.image_size=224 --set pixel.layers=[3,6,9,12] --set mutual.pool_size=40
        --set resources.clip_score.num_gpus=0 [--set ...]

i.e. the MuSc preset on CPU with a RANDOM-weight ViT-B-16 at 224 px (time and memory do not depend
on the weight values; no accuracy is measured or implied). With pool_size >= images the pool is the
whole category, and a pool image's features are 196 tokens x 768 channels x 4 layers x 4 B = 2.4 MB,
so a category's pool is about 96 MB. The run is a subprocess of this script, started and sampled by
benchmarks/bench_scale.py's run_once and TreeSampler (/proc every --interval s over the CLI driver
and the run's `ray::` workers, with VmHWM); see that file for how the run's processes are found.
Reported per C:

  - driver peak RSS:          VmHWM of the CLI driver pid (the pool pass gathers pool features there);
  - largest actor peak RSS:   max VmHWM over the run's `ray::` processes, with the worker's name;
  - wall s:                   run.json wall_seconds;
  - pool files:               the bytes written under OUT/ID/pools/ (the stored pool features), to
                              relate the memory to the feature bytes;
  - ratio:                    driver peak RSS (C categories) / driver peak RSS (the fewest categories,
                              1 by default): the issue asks for <= 1.25 at 15 categories.

--repo DIR runs another checkout's code (e.g. an older commit in a `git worktree`) with this
script and this venv: the run's cwd is DIR, `jobs/musc.yaml` is DIR's, and PYTHONPATH starts with
DIR, so `import pipeline` in the driver resolves to DIR/pipeline (ahead of the venv's editable
install); Ray's workers inherit the driver's environment and get its cwd on their sys.path. Before
the runs, the script checks both: a subprocess with the run's environment prints where `pipeline`
comes from, and (unless --no-worker-check) a tiny local Ray session does the same inside a Ray task
and a Ray actor; a `pipeline` from outside DIR stops the benchmark.

A run that exits non-zero, or whose run.json status is not "succeeded", stops the benchmark with a
non-zero exit (bench_scale.run_once).

Usage:
  .venv/bin/python benchmarks/bench_passes.py [--categories 1 6 15] [--images 40] [--image-size 96]
      [--repo DIR] [--job jobs/musc.yaml] [--set k=v ...] [--json PATH] [--keep DIR] [--interval 0.2]
      [--timeout 3600] [--no-worker-check]
Prints one Markdown table (one row per number of categories) and, with --json, writes every run's
record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_scale  # benchmarks/ is on sys.path when run as a script; it puts its repo on sys.path too
from _machine import cpu_name
from bench_scale import mem_total_gib, run_once

HERE_REPO = Path(__file__).resolve().parent.parent

PRESET = ["clip.model=ViT-B-16", "clip.weights=null", "allow_random_weights=true", "pixel.image_size=224",
          "pixel.layers=[3,6,9,12]", "resources.clip_score.num_gpus=0"]

WORKER_CHECK = r"""
import logging, os, sys
import ray
import pipeline
ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
@ray.remote
def task():
    import pipeline, os
    return pipeline.__file__, os.getcwd()
@ray.remote
class Actor:
    def where(self):
        import pipeline, os
        return pipeline.__file__, os.getcwd()
try:
    print("driver", pipeline.__file__, os.getcwd())
    print("task", *ray.get(task.remote()))
    print("actor", *ray.get(Actor.remote().where.remote()))
finally:
    ray.shutdown()
"""


def run_env(repo: Path) -> dict[str, str]:
    """The environment a run of ``repo``'s code gets: PYTHONPATH starts with ``repo``."""
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(repo) + (os.pathsep + old if old else ""))


def check_code(repo: Path, workers: bool, timeout: float = 180) -> list[str]:
    """Where ``import pipeline`` resolves with the run's environment and cwd: in a plain
    subprocess and, with ``workers``, inside a Ray task and actor. Exits when any is outside ``repo``."""
    want = str(repo / "pipeline") + os.sep
    code = WORKER_CHECK if workers else "import os, pipeline; print('driver', pipeline.__file__, os.getcwd())"
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=repo, env=run_env(repo), capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"bench_passes: the code-location check did not finish within {timeout} s")
    lines = [ln for ln in res.stdout.splitlines() if ln.split(" ", 1)[0] in ("driver", "task", "actor")]
    if res.returncode != 0 or len(lines) != (3 if workers else 1):
        sys.exit(
            f"bench_passes: the code-location check failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr[-3000:]}"
        )
    bad = [ln for ln in lines if not ln.split()[1].startswith(want)]
    if bad:
        sys.exit(f"bench_passes: `import pipeline` does not resolve to {want} with the run's environment: {bad}")
    return lines


def make_images(root: Path, categories: int, images: int, size: int) -> list[list[Path]]:
    """``images`` PNGs per category for ``categories`` categories (category c: seeds from c * 10000)."""
    from tests.helpers.badfiles import write_good_images

    return [
        write_good_images(root / "images" / f"cat{c:02d}", images, size=(size, size), seed=c * 10000)
        for c in range(categories)
    ]


def make_input(root: Path, pools: list[list[Path]], categories: int) -> Path:
    """A folder-layout input of the first ``categories`` categories (hard links): IN/catNN/good_XXX.png."""
    folder = root / f"in-c{categories}"
    if folder.exists():
        shutil.rmtree(folder)
    for c, paths in enumerate(pools[:categories]):
        (folder / f"cat{c:02d}").mkdir(parents=True)
        for p in paths:
            dst = folder / f"cat{c:02d}" / p.name
            try:
                os.link(p, dst)
            except OSError:
                shutil.copyfile(p, dst)
    return folder


def tree_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under ``folder`` (0, 0 when it does not exist)."""
    total = n = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
            n += 1
    return total, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--categories", type=int, nargs="+", default=[1, 6, 15])
    ap.add_argument("--images", type=int, default=40, help="images per category")
    ap.add_argument("--image-size", type=int, default=96, help="side of the generated PNGs (px)")
    ap.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="mutual.pool_size (default: --images, so that the pool is the whole category)",
    )
    ap.add_argument(
        "--repo",
        default=str(HERE_REPO),
        help="the checkout whose code runs (cwd, jobs/, PYTHONPATH); default: this script's repository",
    )
    ap.add_argument("--job", default="jobs/musc.yaml", help="job spec, relative to --repo")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra spec override k=v (repeatable)")
    ap.add_argument("--interval", type=float, default=0.2, help="/proc sampling interval (s)")
    ap.add_argument("--timeout", type=float, default=3600, help="per-run limit (s); exceeding it fails")
    ap.add_argument("--json", dest="json_path", help="write every run's record here")
    ap.add_argument("--keep", help="work in this folder and keep it (inputs, outputs, logs)")
    ap.add_argument(
        "--no-worker-check",
        dest="worker_check",
        action="store_false",
        help="skip checking in a Ray task and actor where `pipeline` is imported from",
    )
    args = ap.parse_args()
    if min(args.categories) < 1 or args.images < 1:
        ap.error("--categories and --images must be >= 1")

    repo = Path(args.repo).resolve()
    if not (repo / "pipeline" / "__init__.py").exists() or not (repo / args.job).exists():
        ap.error(f"--repo {repo}: no pipeline/ package or no {args.job} there")
    sets = PRESET + [f"mutual.pool_size={args.pool_size or args.images}"] + list(args.sets)
    counts = sorted(set(args.categories))

    # run_once starts `zsad run` with cwd bench_scale.REPO and os.environ (+ its tag): point both at --repo
    bench_scale.REPO = repo
    os.environ["PYTHONPATH"] = run_env(repo)["PYTHONPATH"]
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        )
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = None, None
    t0 = time.monotonic()
    where = check_code(repo, args.worker_check)
    print(
        f"[bench_passes] code from {repo} (commit {commit}{', modified' if dirty else ''}); checked in "
        f"{time.monotonic() - t0:.1f} s:\n  " + "\n  ".join(where),
        file=sys.stderr,
        flush=True,
    )

    root = Path(args.keep or tempfile.mkdtemp(prefix="zsad-bench-passes-"))
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    run_args = argparse.Namespace(job=args.job, interval=args.interval, pss=False, timeout=args.timeout)
    runs: list[dict] = []
    try:
        t0 = time.monotonic()
        pools = make_images(root, max(counts), args.images, args.image_size)
        print(
            f"[bench_passes] generated {max(counts)} x {args.images} x {args.image_size}px PNGs in "
            f"{time.monotonic() - t0:.1f} s under {root}",
            file=sys.stderr,
            flush=True,
        )
        for c in counts:
            input_dir = make_input(root, pools, c)
            run_id = f"passes-{stamp}-c{c}"
            rec = run_once(run_args, sets, input_dir, root / "out", run_id, root / f"{run_id}.log")
            run_dir = root / "out" / run_id
            pool_bytes, pool_files = tree_bytes(run_dir / "pools")
            manifest = json.loads((run_dir / "run.json").read_text())
            mutual = manifest.get("mutual") or {}
            rec.update(
                categories=c,
                images_per_category=args.images,
                pool_bytes=pool_bytes,
                pool_files=pool_files,
                pool_images=mutual.get("pools_pool_images"),
                pool_pass_s=mutual.get("pools_seconds"),
            )
            runs.append(rec)
            print(
                f"[bench_passes] {c} categories: wall {rec['wall_s']} s, driver {rec['driver_peak_rss_mb']} MB, "
                f"largest actor {rec['worker_peak_rss_mb']} MB ({rec['worker_peak_name']}), pool files "
                f"{pool_bytes} B in {pool_files} files, pool pass {rec['pool_pass_s']} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    base = runs[0]

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / base[key]:.2f}" if r[key] and base[key] else "-"

    machine = f"{os.cpu_count()} CPU cores ({cpu_name()}), {mem_total_gib():.0f} GiB"
    code = f"{repo}" + (f" at {commit}" if commit else "") + (" (modified)" if dirty else "")
    print(
        f"\n{dt.date.today().isoformat()}, {machine}; code: {code}; `zsad run {args.job}` "
        f"{' '.join('--set ' + s for s in sets)} on C categories x {args.images} x {args.image_size}px PNG "
        "(folder layout, --no-evaluate)\n"
    )
    c0 = base["categories"]
    print(
        f"| categories | images | driver peak RSS MiB | largest actor peak RSS MiB (name) | wall s | pool pass s | "
        f"pool files MiB | driver ratio vs {c0} cat | actor ratio vs {c0} cat |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        mark = " *" if r["other_ray_processes_seen"] else ""
        print(
            f"| {r['categories']}{mark} | {r['images']} | {r['driver_peak_rss_mb']} | {r['worker_peak_rss_mb']} "
            f"({r['worker_peak_name']}) | {r['wall_s']} | {r['pool_pass_s']} | {r['pool_bytes'] / 2**20:.1f} | "
            f"{ratio(r, 'driver_peak_rss_mb')} | {ratio(r, 'worker_peak_rss_mb')} |"
        )
    print(
        "\npool files written (sum of sizes under RUN/pools/): "
        + ", ".join(
            f"{r['categories']} cat: {r['pool_bytes']} B ({r['pool_files']} files, {r['pool_images']} pool images)"
            for r in runs
        )
    )
    print(
        "\nactors (`ray::MapWorker` processes, in start order: the pool pass's come first) peak RSS MiB "
        "(first-last seen s after the start):"
    )
    for r in runs:
        actors = sorted(
            (p for p in r["processes"] if any(n.startswith("ray::MapWorker") for n in p["names"])),
            key=lambda p: p["first_seen_s"],
        )
        print(
            f"  {r['categories']} cat: "
            + ", ".join(f"{p['peak_rss_mb']} ({p['first_seen_s']}-{p['last_seen_s']})" for p in actors)
        )
    if any(r["other_ray_processes_seen"] for r in runs):
        print("\n\\* another Ray (not this run's) was running on the machine during this run: figures disturbed")

    if args.json_path:
        from importlib.metadata import version

        doc = {
            "date": dt.date.today().isoformat(),
            "machine": machine,
            "python": platform.python_version(),
            "torch": version("torch"),
            "ray": version("ray"),
            "repo": str(repo),
            "commit": commit,
            "modified": dirty,
            "code_check": where,
            "job": args.job,
            "sets": sets,
            "images_per_category": args.images,
            "image_size": args.image_size,
            "categories": counts,
            "interval_s": args.interval,
            "runs": runs,
        }
        Path(args.json_path).write_text(json.dumps(doc, indent=1))
        print(f"\nwrote {args.json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
