"""The GPU suite's end-to-end steps (benchmarks/gpu_suite.py): `zsad run` of a preset as a CLI
subprocess (its own local Ray) on generated images, timed from its run.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_suite_base import (  # benchmarks/ is on sys.path when the suite runs as a script
    RANDOM,
    REPO,
    StepError,
    StepTimeout,
    Suite,
    failed_row,
    fmt_num,
    require,
    row,
    stop_run,
)

PROGRESS = re.compile(r"progress: (\d+)/(\d+) images \(\d+%\), ([\d.]+) images/s")

# the e2e steps: preset, the pool of generated images, overrides, and the tiny overrides of --dry-run
# (tests/e2e/test_vvv.py, tests/e2e/test_gpu_execution.py)
E2E_PRESETS: dict[str, dict[str, Any]] = {
    "e2e_default": {"job": "default.yaml", "pool": "objects", "sets": [],
                    "tiny": ["clip.model=zsad-tiny", "pixel.scales=[64]", "pixel.grid=8", "pixel.gem_depth=2",
                             "maps.map_size=32"]},
    "e2e_vvv": {"job": "vvv.yaml", "pool": "scenes", "sets": ["sam.weights=null"],
                "tiny": ["clip.model=zsad-tiny", "sam.model=tiny", "pixel.scales=[128]", "pixel.grid=8",
                         "pixel.gem_depth=2", "tiling.min_tile=96", "tiling.tile_map_size=32", "maps.map_size=32",
                         "foreground.points_per_side=4"]},
}
# the same VVV run with the model stages fused into one actor pool (runtime.fuse_models), on the same images
E2E_PRESETS["e2e_vvv_fused"] = {**E2E_PRESETS["e2e_vvv"], "sets": ["sam.weights=null", "runtime.fuse_models=true"]}



# ------------------------------------------------------------------------------------------ e2e steps


def _pool(suite: Suite, kind: str, n: int, size: int) -> tuple[str, list[Path]]:
    """Generate ``n`` distinct images once per suite: (category, PNG paths)."""
    from pipeline.synthetic import make_dataset, make_multi_instance_dataset

    root = suite.work / f"pool-{kind}-{size}"
    if kind == "objects":  # single objects with defects (MVTec-like)
        category = "widget"
        if not root.exists():
            make_dataset(str(root), categories=(category,), n_good=n // 2, n_bad=n - n // 2, n_train=0, size=size,
                         seed=0)
    else:  # multi-object scenes, what VVV's foreground extraction and tiling are for
        category = "pills"
        if not root.exists():
            make_multi_instance_dataset(str(root), n_good=n // 2, n_bad=n - n // 2, size=(size, size), seed=0,
                                        category=category)
    paths = sorted(p for p in (root / category / "test").glob("*/*.png"))
    if not paths:
        raise StepError(f"no images were generated under {root}")
    return category, paths


def _link_input(folder: Path, category: str, pool: list[Path], n: int) -> Path:
    """A `folder`-layout input of ``n`` images (hard links to the pool, round robin)."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / category).mkdir(parents=True)
    for i in range(n):
        src, dst = pool[i % len(pool)], folder / category / f"{i:05d}.png"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return folder


def _stage_rate(suite: Suite, step: str, precision: str) -> float | None:
    rec = suite.step(step)
    rows = [r for r in (rec or {}).get("rows", []) if r["status"] == "ok"]
    best = [r for r in rows if r["precision"] == precision] or rows
    return best[0]["images_per_s"] if best else None


def _reap_group(pgid: int, wait_s: float = 10.0) -> None:
    """After the run exited: give processes left in its group (Ray's) time to end, then SIGTERM them."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)


def _partial(log_text: str) -> dict[str, Any] | None:
    last = None
    for m in PROGRESS.finditer(log_text):
        last = m
    if last is None:
        return None
    return {"images_done": int(last.group(1)), "images_total": int(last.group(2)), "images_per_s": float(last.group(3))}


def _run_json_precision(record: dict) -> dict[str, Any]:
    """Any precision the run recorded outside its spec (keys containing 'precision')."""
    found: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "spec" and not path:
                    continue
                if "precision" in str(k) and not isinstance(v, (dict, list)):
                    found[f"{path}{k}"] = v
                walk(v, f"{path}{k}.")

    walk(record, "")
    return found


def _launch(suite: Suite, key: str, deadline: float) -> dict[str, Any]:
    """Prepare the input of e2e step ``key`` and start its `zsad run` (not waited for)."""
    require("ray", "open_clip", "pyarrow", "pydantic", "yaml", "typer", "fsspec", "PIL", "pandas")
    if key.startswith("e2e_vvv"):
        require("segment_anything")
    from pipeline.config import load_spec
    from pipeline.models.precision import resolve

    cfg, preset = suite.cfg, E2E_PRESETS[key]
    asked = cfg.e2e_images if key == "e2e_default" else cfg.vvv_images
    sets = (RANDOM + ["report.enabled=false", f"runtime.executor={suite.args.e2e_executor}"] + preset["sets"]
            + (preset["tiny"] if cfg.dry_run else []))
    job = REPO / "jobs" / preset["job"]
    spec = load_spec(str(job), sets)  # the spec the run will use (checked here, before Ray starts)

    category, pool = _pool(suite, preset["pool"], cfg.pool_images, cfg.image_size)
    stop_grace = 30.0  # _stop (20 s) + _reap_group (10 s)
    timeout = deadline - time.monotonic() - stop_grace
    if timeout < 20:
        raise StepError(f"only {max(timeout, 0):.0f} s left for the run ({stop_grace:.0f} s kept to stop it): "
                        "not enough to start Ray and a model")
    used, fit = asked, None
    if key == "e2e_default":  # fewer images when the FADE stage's rate says they would not fit
        auto = resolve(spec.clip.precision, cfg.device)
        rate = _stage_rate(suite, "fade_zero_shot", auto)
        if rate:
            fits = int(rate * max(0.0, timeout - cfg.e2e_overhead_s) * 0.6)
            fit = {"stage_rate_from": f"fade_zero_shot ({auto})", "stage_images_per_s": rate,
                   "run_timeout_s": round(timeout, 1), "overhead_s": cfg.e2e_overhead_s, "images_that_fit": fits}
            if fits < asked:
                used = max(fits, min(asked, 16))
    folder = _link_input(suite.work / f"in-{key}", category, pool, used)
    out = suite.work / f"out-{key}"
    run_id = f"{key.replace('_', '-')}-{suite.stamp}"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(job), "--input", str(folder), "--output", str(out),
           "--run-id", run_id, "--layout", "folder", "--no-evaluate"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    logs = suite.out_dir / "e2e"
    logs.mkdir(exist_ok=True)
    log_path = logs / f"{key}.log"
    e2e: dict[str, Any] = {"job": f"jobs/{preset['job']}", "images_asked": asked, "images_used": used,
                           "image_size": cfg.image_size, "distinct_images": len(pool), "fit": fit,
                           "command": " ".join(shlex.quote(c) for c in cmd), "log": str(log_path),
                           "timeout_s": round(timeout, 1)}
    print(f"[gpu_suite] {key}: zsad run on {used} images (asked {asked}), at most {timeout:.0f} s", file=sys.stderr,
          flush=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return {"e2e": e2e, "spec": spec, "preset": preset, "pool": pool, "asked": asked, "out": out, "run_id": run_id,
            "logs": logs, "log_path": log_path, "log": log, "proc": proc, "t": time.monotonic(), "timeout": timeout,
            "deadline": deadline}


def step_e2e(key: str) -> Callable[[Suite, dict, float], None]:
    def run(suite: Suite, rec: dict, deadline: float) -> None:
        from pipeline.models.precision import resolve

        cfg = suite.cfg
        launched = suite.launched.pop(key, None)
        if launched is None:
            if cfg.dry_run:  # the dry run starts its e2e runs together: they check the paths, their times are
                for other in suite.wanted:  # not figures
                    ahead = other in E2E_PRESETS and other != key and other not in suite.launched
                    if ahead and suite.step(other) is None:
                        suite.launched[other] = _launch(suite, other, deadline)
            launched = _launch(suite, key, deadline)
        rec["e2e"] = e2e = launched["e2e"]
        spec, preset, pool, asked = launched["spec"], launched["preset"], launched["pool"], launched["asked"]
        out, run_id, logs, log_path = launched["out"], launched["run_id"], launched["logs"], launched["log_path"]
        proc, t = launched["proc"], launched["t"]
        timeout = max(1.0, min(launched["deadline"], deadline) - 30.0 - time.monotonic())
        with launched["log"]:
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                stop_run(proc)
                rc = proc.returncode
            except BaseException:
                stop_run(proc, grace_s=5)
                raise
        e2e["process_s"] = round(time.monotonic() - t, 2)
        e2e["exit_code"] = rc
        _reap_group(proc.pid)
        text = log_path.read_text(errors="replace")
        manifest = out / run_id / "run.json"
        if timed_out or not manifest.exists():
            e2e["partial"] = part = _partial(text)
            what = f"timed out after {timeout:.0f} s" if timed_out else f"exited {rc} without a run.json"
            if part:  # the run's own progress line still gives a rate
                what += (f" (progress then: {part['images_done']}/{part['images_total']} images, "
                         f"{part['images_per_s']} images/s)")
                failed = failed_row(f"jobs/{preset['job']}", spec.resources.clip_score.batch_size,
                                    f"clip {spec.clip.precision}", "timeout" if timed_out else "error", what)
                rec["rows"].append({**failed, "images_per_s": part["images_per_s"]})
            e2e["log_tail"] = text[-3000:]
            raise (StepTimeout if timed_out else StepError)(f"zsad run {what}; log {log_path}")
        record = json.loads(manifest.read_text())
        shutil.copyfile(manifest, logs / f"{key}.run.json")
        counts, st = record["counts"], record["stage_seconds"]
        wall = float(record["wall_seconds"])
        images = int(counts["images"])
        clip_p = spec.clip.precision
        precision = f"clip {clip_p}->{resolve(clip_p, cfg.device)}"
        model = spec.clip.model
        if spec.uses_sam():
            sam_p = spec.sam.precision
            precision += f", sam {sam_p}->{resolve(sam_p, cfg.device)}"
            model += f" + SAM {spec.sam.model}"
            if spec.foreground is not None and spec.foreground.kind == "sam_dis":
                pps = spec.foreground.points_per_side
                model += f" ({pps}x{pps} points)"
        steady = None
        first, plan = st.get("first_result_wall"), st.get("plan_wall")
        done_first = int(record.get("first_result_rows") or 0)
        if first is not None and plan and plan > first and images > done_first:
            steady = round((images - done_first) / (plan - first), 3)
        # each timed stage's own rate: images / the seconds its actors (or tasks) spent on them
        busy = {k[: -len("_busy")]: round(images / v, 3) for k, v in st.items() if k.endswith("_busy") and v}
        e2e.update(images_scored=int(counts["ok"]), counts=counts, run_status=record["status"],
                   reason=record.get("reason"), wall_seconds=wall, stage_seconds=st, first_result_rows=done_first,
                   images_per_s=round(images / wall, 3),
                   images_per_s_steady=steady, stage_images_per_s=busy,
                   precision_spec={"clip": clip_p, **({"sam": spec.sam.precision} if spec.uses_sam() else {})},
                   precision_recorded=_run_json_precision(record) or None,
                   ray_resources=(record.get("ray") or {}).get("resources"))
        where = "local Ray" if spec.runtime.executor == "ray" else "in-process executor, no Ray"
        notes = (f"zsad run (CLI, {where}), {images} x {cfg.image_size} px PNG ({len(pool)} distinct), asked {asked}; "
                 f"images / run.json wall_seconds {wall:.1f} s (incl. Ray start; first result at {first} s); "
                 f"steady {fmt_num(steady)}/s; own rate of the CLIP actor {fmt_num(busy.get('clip_score'))}/s"
                 + (f", SAM foreground actor {fmt_num(busy.get('foreground'))}/s" if "foreground" in busy else "")
                 + ("; runtime.fuse_models: one actor pool for foreground..clip_score"
                    if spec.runtime.fuse_models else "")
                 + "; "
                 f"batch: the preset's clip_score batch; status {record['status']}")
        if rc != 0 or record["status"] != "succeeded":
            rec["rows"].append({**failed_row(model, spec.resources.clip_score.batch_size, precision, "error",
                                             f"run {record['status']} (exit {rc}): {record.get('reason')}"),
                                "images_per_s": e2e["images_per_s"]})
            return
        rec["rows"].append(row(model, spec.resources.clip_score.batch_size, precision, notes=notes,
                               images_per_s=e2e["images_per_s"], tflops=None))

    return run
