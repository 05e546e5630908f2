"""End-to-end `zsad run` at several input sizes: wall time, images/s and peak memory per process.

For each size N (default 200, 800, 3200), N small synthetic RGB PNGs (default 96 x 96, from
tests.helpers.badfiles.write_good_images; generated once, outside the timed part, and hard-linked
into one `folder`-layout input per size) are scored by

    zsad run JOB --input DIR --output OUT --layout folder --no-evaluate --run-id ID [--set ...]

as a subprocess (cwd = the repository root, local Ray started by the CLI). While it runs, /proc is
sampled every --interval seconds (default 0.2) over the run's process tree: the CLI driver and
every process the run created (raylet, GCS, Ray's helper processes, `ray::` task and actor
workers). A process belongs to the run when its pid did not exist before the run started AND it
either descends from the driver or carries this run's marker in its environment (an env var the
driver is started with and that every Ray process inherits); that survives re-parenting, and it
ignores other people's Ray on a shared machine. Reported per run:

  - driver peak RSS:         max VmHWM of the CLI driver pid;
  - largest worker peak RSS: max VmHWM over `ray::` processes (task/actor workers), with the
                             worker's name(s) (e.g. the CLIP actor, into which Ray Data fuses
                             decode: ray::MapWorker(MapBatches(run)->MapBatches(_ActorStage)),
                             or the encode tasks: ray::MapBatches(run)->Project);
  - tree peak RSS:           max over samples of the sum of VmRSS over the whole tree (shared
                             pages, e.g. torch's libraries and the object store, count in every
                             process that maps them, so this over-counts; --pss adds the sum of
                             PSS, where shared pages are divided among the processes);
  - from OUT/ID/run.json:    counts, wall_seconds, stage_seconds (plan_wall, first_result_wall,
                             clip_score_busy, ...); images/s = images / wall_seconds and
                             images / plan_wall.

After the driver exits, any process of the run still alive is waited for (up to 15 s), then sent
SIGTERM (then SIGKILL; only those pids). A run that exits non-zero, or whose run.json status is not "succeeded",
stops the benchmark with a non-zero exit.

Usage:
  .venv/bin/python benchmarks/bench_scale.py [--sizes 200 800 3200] [--clip-actors K]
      [--repeat 1] [--image-size 96] [--job jobs/smoke.yaml] [--set k=v ...] [--json PATH] [--keep DIR]
      [--pss] [--interval 0.2] [--timeout 3600]
Prints one Markdown table (one row per size; medians over --repeat runs) and, with --json, writes
every run's record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from _machine import cpu_name  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.helpers and pipeline, whatever the cwd

TAG_VAR = "ZSAD_BENCH_SCALE_TAG"


# --------------------------------------------------------------------------------------------
# /proc helpers


def _read(path: str, mode: str = "r") -> str | bytes | None:
    try:
        with open(path, mode) as fh:
            return fh.read()
    except (OSError, ValueError):
        return None


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, starttime, state) from /proc/PID/stat, or None when the process is gone."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) "
    try:
        return int(fields[1]), int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    raw = _read(f"/proc/{pid}/cmdline", "rb")
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() if raw else ""


def _comm(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or "").strip()


def _mem_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB, or None for a gone or zombie process (no memory lines)."""
    text = _read(f"/proc/{pid}/status")
    if not text:
        return None
    rss = hwm = None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return None if rss is None else (rss, hwm or rss)


def _pss_kb(pid: int) -> int:
    """Proportional set size (shared pages divided among the processes mapping them), in kB."""
    for line in (_read(f"/proc/{pid}/smaps_rollup") or "").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def snapshot() -> set[tuple[int, int]]:
    """(pid, starttime) of every process now: anything in it existed before the run."""
    keys = set()
    for pid in _pids():
        st = _stat(pid)
        if st:
            keys.add((pid, st[1]))
    return keys


def mem_total_gib() -> float:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _short(name: str) -> str:
    """``ray::Class(...).method`` -> ``ray::Class(...)``: a worker's name without the call it is in."""
    return re.sub(r"\.[A-Za-z_][A-Za-z0-9_]*$", "", name) if name.startswith("ray::") else name


def _role(cmd: str, comm: str) -> str:
    """A short name for a process of the run."""
    if cmd.startswith("ray::") or comm.startswith("ray::"):
        return (cmd or comm).split()[0]
    first = cmd.split()[0] if cmd else comm
    base = os.path.basename(first)
    if base.startswith("python"):
        # python -m x / python path/to/script.py: name the module or script
        parts = cmd.split()
        for i, p in enumerate(parts[1:], 1):
            if p == "-m" and i + 1 < len(parts):
                return f"python -m {parts[i + 1]}"
            if p.endswith(".py"):
                return os.path.basename(p)
    return base or "?"


# --------------------------------------------------------------------------------------------
# the process-tree sampler


class TreeSampler:
    """Tracks the run's processes (new since ``before``, descending from the driver or carrying
    ``tag`` in their environment) and their memory."""

    def __init__(self, driver_pid: int, before: set[tuple[int, int]], tag: str, interval: float,
                 pss: bool = False) -> None:
        self.driver = driver_pid
        st = _stat(driver_pid)
        self.driver_key = (driver_pid, st[1] if st else -1)  # pid + start time: immune to pid reuse
        self.before = before
        self.tag = f"{TAG_VAR}={tag}".encode()
        self.interval = interval
        self.pss = pss
        self.tree_peak_pss_kb = 0
        self.ours: dict[tuple[int, int], dict] = {}  # (pid, starttime) -> per-process record
        self.foreign: set[tuple[int, int]] = set()  # new, not ours (checked once)
        self.foreign_ray: dict[tuple[int, int], str] = {}  # new ray processes that are not ours
        self.tree_peak_kb = 0
        self.tree_peak_at = 0.0
        self.tree_peak_procs = 0
        self.samples = 0
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    # -- classification
    def _is_ours(self, pid: int, ppid: int, live: dict[int, tuple[int, int, str]]) -> tuple[bool, str]:
        seen = set()
        p = ppid
        while p > 1 and p in live and p not in seen:  # ancestor chain (this sample's view)
            seen.add(p)
            key = (p, live[p][1])
            if key == self.driver_key or key in self.ours:
                return True, "descendant"
            p = live[p][0]
        if self._tagged(pid):
            return True, "env-tag"
        return False, ""

    def _tagged(self, pid: int) -> bool:
        env = _read(f"/proc/{pid}/environ", "rb")
        return bool(env) and self.tag in env.split(b"\0")

    def scan(self) -> list[tuple[int, int]]:
        """One pass over /proc: classify new processes; return the live keys of ours."""
        live: dict[int, tuple[int, int, str]] = {}
        for pid in _pids():
            st = _stat(pid)
            if st:
                live[pid] = st
        keys = []
        for pid, (ppid, start, state) in live.items():
            key = (pid, start)
            if key in self.before or key in self.foreign:
                continue
            if key not in self.ours:
                if key == self.driver_key:
                    ok, how = True, "driver"
                else:
                    ok, how = self._is_ours(pid, ppid, live)
                if not ok:
                    self.foreign.add(key)
                    cmd = _cmdline(pid)
                    if "ray" in cmd:
                        self.foreign_ray[key] = cmd[:120]
                    continue
                self.ours[key] = {"pid": pid, "found_by": how, "env_tag": how == "env-tag" or self._tagged(pid),
                                  "names": [], "peak_hwm_kb": 0, "peak_rss_kb": 0,
                                  "first_seen_s": round(time.monotonic() - self.t0, 2)}
            if state != "Z":
                keys.append(key)
        return keys

    def sample(self) -> None:
        total, total_pss, n = 0, 0, 0
        for key in self.scan():
            rec = self.ours[key]
            mem = _mem_kb(key[0])
            if mem is None:
                continue
            rss, hwm = mem
            cmd, comm = _cmdline(key[0]), _comm(key[0])
            name = "zsad driver" if key[0] == self.driver else _role(cmd, comm)
            if name and name not in rec["names"]:
                rec["names"].append(name)
            if cmd:
                rec["cmdline"] = cmd[:200]
            rec["peak_hwm_kb"] = max(rec["peak_hwm_kb"], hwm)
            rec["peak_rss_kb"] = max(rec["peak_rss_kb"], rss)
            rec["last_seen_s"] = round(time.monotonic() - self.t0, 2)
            total += rss
            n += 1
            if self.pss:
                total_pss += _pss_kb(key[0])
        self.samples += 1
        self.tree_peak_pss_kb = max(self.tree_peak_pss_kb, total_pss)
        if total > self.tree_peak_kb:
            self.tree_peak_kb, self.tree_peak_procs = total, n
            self.tree_peak_at = round(time.monotonic() - self.t0, 2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    # -- after the run
    def alive(self) -> list[tuple[int, int]]:
        return [k for k in self.scan() if k != self.driver_key]

    def reap(self, grace_s: float = 15.0) -> list[dict]:
        """Wait up to ``grace_s`` for the run's processes to exit; SIGTERM (then SIGKILL) only
        those still alive. Returns what had to be signalled."""
        deadline = time.monotonic() + grace_s
        left = self.alive()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.alive()
        killed = []
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            if not left:
                break
            for pid, start in left:
                st = _stat(pid)
                if st is None or st[1] != start:  # gone, or the pid was reused
                    continue
                killed.append({"pid": pid, "signal": sig.name, "names": self.ours[(pid, start)]["names"],
                               "cmdline": _cmdline(pid)[:120]})
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait_s
            while left and time.monotonic() < end:
                time.sleep(0.2)
                left = self.alive()
        if left:
            names = [self.ours[k]["names"] for k in left]
            print(f"WARNING: processes of the run still alive after SIGKILL: {left} {names}", file=sys.stderr)
        return killed


# --------------------------------------------------------------------------------------------
# one run


def make_pool(root: Path, n: int, size: int) -> list[Path]:
    from tests.helpers.badfiles import write_good_images

    return write_good_images(root / "pool", n, size=(size, size), seed=0)


def make_input(root: Path, pool: list[Path], n: int) -> Path:
    """A folder-layout input of the first n pool images (hard links; category `bench`)."""
    folder = root / f"in-{n}"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "bench").mkdir(parents=True)
    for p in pool[:n]:
        dst = folder / "bench" / p.name
        try:
            os.link(p, dst)
        except OSError:
            shutil.copyfile(p, dst)
    return folder


def _worker_name(names: list[str]) -> str:
    short = list(dict.fromkeys(_short(n) for n in names if n.startswith("ray::") and n != "ray::IDLE"))
    return " / ".join(short) or "ray::IDLE"


def run_once(args: argparse.Namespace, sets: list[str], input_dir: Path, out_dir: Path, run_id: str,
             log_path: Path) -> dict:
    zsad = os.path.join(os.path.dirname(sys.executable), "zsad")
    cmd = [zsad, "run", args.job, "--input", str(input_dir), "--output", str(out_dir), "--layout", "folder",
           "--no-evaluate", "--run-id", run_id]
    for s in sets:
        cmd += ["--set", s]
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG_VAR: tag})
    before = snapshot()
    print(f"[bench_scale] {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, before, tag, args.interval, pss=args.pss)
        sampler.start()
        timed_out = False
        try:
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.send_signal(signal.SIGINT)  # let ray.shutdown run
                try:
                    rc = proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
            except BaseException:  # Ctrl-C: stop the run, then clean up below
                proc.terminate()
                proc.wait()
                raise
        finally:
            process_s = time.monotonic() - t0
            sampler.stop()
            killed = sampler.reap()
    tail = (_read(str(log_path)) or "")[-3000:]
    if timed_out:
        sys.exit(
            f"bench_scale: `zsad run` did not finish within --timeout {args.timeout} s ({run_id}); log tail:\n{tail}"
        )
    if rc != 0:
        sys.exit(f"bench_scale: `zsad run` exited {rc} ({run_id}); log tail:\n{tail}")
    manifest_path = out_dir / run_id / "run.json"
    if not manifest_path.exists():
        sys.exit(f"bench_scale: {manifest_path} is missing although `zsad run` exited 0; log tail:\n{tail}")
    m = json.loads(manifest_path.read_text())
    if m.get("status") != "succeeded":
        sys.exit(f"bench_scale: run {run_id} status {m.get('status')!r}: {m.get('reason')}")

    procs = sorted(sampler.ours.values(), key=lambda r: -r["peak_hwm_kb"])
    driver = next((r for r in procs if r["pid"] == proc.pid), None)
    workers = [r for r in procs if any(n.startswith("ray::") for n in r["names"])]
    top = workers[0] if workers else None
    counts, st = m["counts"], m["stage_seconds"]
    clip = m.get("spec", {}).get("resources", {}).get("clip_score", {})
    lo, hi = clip.get("min_actors"), clip.get("max_actors")
    images = counts["images"]
    record = {
        "run_id": run_id,
        "images": images,
        "ok": counts["ok"],
        "failed": counts["failed"],
        "clip_actors": f"{lo}" if lo == hi else f"{lo}-{hi}",
        "wall_s": m["wall_seconds"],
        "process_s": round(process_s, 2),
        "plan_s": st["plan_wall"],
        "first_result_s": st["first_result_wall"],
        "stage_seconds": st,
        "images_per_s_wall": round(images / m["wall_seconds"], 2),
        "images_per_s_plan": round(images / st["plan_wall"], 2) if st["plan_wall"] else None,
        "clip_actor_images_per_s": round(images / st["clip_score_busy"], 2) if st.get("clip_score_busy") else None,
        "driver_peak_rss_mb": round(driver["peak_hwm_kb"] / 1024) if driver else None,
        "worker_peak_rss_mb": round(top["peak_hwm_kb"] / 1024) if top else None,
        "worker_peak_name": _worker_name(top["names"]) if top else None,
        "tree_peak_rss_mb": round(sampler.tree_peak_kb / 1024),
        "tree_peak_pss_mb": round(sampler.tree_peak_pss_kb / 1024) if args.pss else None,
        "tree_peak_at_s": sampler.tree_peak_at,
        "tree_peak_processes": sampler.tree_peak_procs,
        "samples": sampler.samples,
        "processes": [
            {
                "pid": r["pid"],
                "names": r["names"],
                "found_by": r["found_by"],
                "env_tag": r["env_tag"],
                "peak_rss_mb": round(r["peak_hwm_kb"] / 1024),
                "first_seen_s": r["first_seen_s"],
                "last_seen_s": r.get("last_seen_s"),
                "cmdline": r.get("cmdline", ""),
            }
            for r in procs
        ],
        "signalled_after_run": killed,
        "other_ray_processes_seen": sorted(set(sampler.foreign_ray.values()))[:10],
    }
    if sampler.foreign_ray:
        print(
            f"WARNING: {len(sampler.foreign_ray)} Ray processes not belonging to this run appeared during it "
            "(another Ray on this machine): timings may be disturbed",
            file=sys.stderr,
        )
    if killed:
        print(
            f"WARNING: {len(killed)} processes of the run outlived the driver by 15 s and were signalled: "
            f"{[(k['pid'], k['names']) for k in killed]}",
            file=sys.stderr,
        )
    return record


# --------------------------------------------------------------------------------------------


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    med = statistics.median(vals)
    if all(isinstance(v, int) for v in vals):
        return int(round(med))
    return round(med, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="jobs/smoke.yaml")
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 800, 3200])
    ap.add_argument(
        "--clip-actors",
        type=int,
        default=None,
        help="sets resources.clip_score.min_actors = max_actors = K (default: the job's)",
    )
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=96, help="side of the generated PNGs (px)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="spec override k=v (repeatable)")
    ap.add_argument("--interval", type=float, default=0.2, help="/proc sampling interval (s)")
    ap.add_argument(
        "--pss",
        action="store_true",
        help="also sample PSS (/proc/PID/smaps_rollup: shared pages counted once) for a tree total "
        "without double counting; costlier per sample",
    )
    ap.add_argument("--timeout", type=float, default=3600, help="per-run limit (s); exceeding it fails")
    ap.add_argument("--json", dest="json_path", help="write every run's record here")
    ap.add_argument("--keep", help="work in this folder and keep it (inputs, outputs, logs)")
    args = ap.parse_args()
    if min(args.sizes) < 1 or args.repeat < 1:
        ap.error("--sizes and --repeat must be >= 1")

    sets = list(args.sets)
    if args.clip_actors is not None:
        sets += [
            f"resources.clip_score.min_actors={args.clip_actors}",
            f"resources.clip_score.max_actors={args.clip_actors}",
        ]
    sizes = sorted(set(args.sizes))
    root = Path(args.keep or tempfile.mkdtemp(prefix="zsad-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    runs: list[dict] = []
    try:
        t0 = time.monotonic()
        pool = make_pool(root, max(sizes), args.image_size)
        print(
            f"[bench_scale] generated {len(pool)} x {args.image_size}px PNGs in {time.monotonic() - t0:.1f} s "
            f"under {root}",
            file=sys.stderr,
            flush=True,
        )
        for n in sizes:
            input_dir = make_input(root, pool, n)
            for rep in range(args.repeat):
                run_id = f"scale-{stamp}-n{n}-r{rep}"
                rec = run_once(args, sets, input_dir, root / "out", run_id, root / f"{run_id}.log")
                rec["repeat"] = rep
                runs.append(rec)
                print(
                    f"[bench_scale] n={n} rep={rep}: wall {rec['wall_s']} s, {rec['images_per_s_wall']} img/s, "
                    f"driver {rec['driver_peak_rss_mb']} MB, worker {rec['worker_peak_rss_mb']} MB "
                    f"({rec['worker_peak_name']}), tree {rec['tree_peak_rss_mb']} MB",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    # one row per size: medians over the repeats
    rows = []
    for n in sizes:
        rs = [r for r in runs if r["images"] == n]
        row = {
            k: _median(rs, k)
            for k in (
                "wall_s",
                "first_result_s",
                "images_per_s_wall",
                "images_per_s_plan",
                "driver_peak_rss_mb",
                "worker_peak_rss_mb",
                "tree_peak_rss_mb",
                "tree_peak_pss_mb",
            )
        }
        names = sorted({r["worker_peak_name"] for r in rs if r["worker_peak_name"]})
        row.update(
            images=n,
            clip_actors=rs[0]["clip_actors"],
            worker_peak_name=", ".join(names),
            runs=len(rs),
            disturbed=any(r["other_ray_processes_seen"] for r in rs),
        )
        rows.append(row)
    base = rows[0]

    def ratio(row: dict, key: str) -> str:
        if row is base or not row[key] or not base[key]:
            return "-"
        return f"{row[key] / base[key]:.2f}"

    machine = f"{os.cpu_count()} CPU cores ({cpu_name()}), {mem_total_gib():.0f} GiB"
    print(
        f"\n{dt.date.today().isoformat()}, {machine}; `zsad run {args.job}` "
        f"{' '.join('--set ' + s for s in sets)} on N x {args.image_size}px PNG (folder layout)"
        + (f"; medians of {args.repeat} runs" if args.repeat > 1 else "")
        + "\n"
    )
    n0 = base["images"]
    pss_h, pss_sep = (" tree peak PSS MB |", "---|") if args.pss else ("", "")
    print(
        f"| images | clip actors | wall s | first result s | images/s (wall) | images/s (plan) | driver peak RSS MB | "
        f"largest worker peak RSS MB (name) | tree peak RSS MB |{pss_h} driver RSS ratio vs {n0} | "
        f"worker RSS ratio vs {n0} |"
    )
    print("|---|---|---|---|---|---|---|---|---|" + pss_sep + "---|---|")
    for r in rows:
        pss = f" {r['tree_peak_pss_mb']} |" if args.pss else ""
        mark = " *" if r["disturbed"] else ""
        print(
            f"| {r['images']}{mark} | {r['clip_actors']} | {r['wall_s']} | {r['first_result_s']} | "
            f"{r['images_per_s_wall']} | {r['images_per_s_plan']} | {r['driver_peak_rss_mb']} | "
            f"{r['worker_peak_rss_mb']} ({r['worker_peak_name']}) | {r['tree_peak_rss_mb']} |{pss} "
            f"{ratio(r, 'driver_peak_rss_mb')} | {ratio(r, 'worker_peak_rss_mb')} |"
        )
    if any(r["disturbed"] for r in rows):
        print("\n\\* another Ray (not this run's) was running on the machine during this size: timings disturbed")

    if args.json_path:
        from importlib.metadata import version

        doc = {
            "date": dt.date.today().isoformat(),
            "machine": machine,
            "python": platform.python_version(),
            "torch": version("torch"),
            "ray": version("ray"),
            "job": args.job,
            "sets": sets,
            "image_size": args.image_size,
            "sizes": sizes,
            "repeat": args.repeat,
            "interval_s": args.interval,
            "summary": rows,
            "runs": runs,
        }
        Path(args.json_path).write_text(json.dumps(doc, indent=1))
        print(f"\nwrote {args.json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
