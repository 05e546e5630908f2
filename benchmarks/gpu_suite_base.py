"""The GPU suite's machinery (benchmarks/gpu_suite.py): its settings, the helpers its steps time
and record with, and :class:`Suite`, which runs the steps within the budget and writes
gpu_suite.json and gpu_suite.md. The steps are in gpu_suite_micro.py (model and stage throughput)
and gpu_suite_e2e.py (`zsad run` end to end).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # pipeline, whatever the cwd (the package need not be installed)
sys.path.insert(0, str(REPO / "benchmarks"))  # _machine

RANDOM = ["clip.weights=null", "allow_random_weights=true"]


# ------------------------------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the steps run: the full models on the GPU, or tiny ones for --dry-run."""

    dry_run: bool
    device: str  # "cuda" or "cpu"
    clip_models: tuple[str, ...]
    clip_batches: tuple[int, ...]
    precisions: tuple[str, ...]  # micro steps
    stage_precisions: tuple[str, ...]  # stage steps (the first is the presets' default on this device)
    stage_batch: int | None  # None: the preset's resources.clip_score.batch_size
    image_size: int  # side of the generated images (stage steps, SamEngine.embed, e2e)
    sam_model: str
    sam_batches: tuple[int, ...]
    e2e_images: int
    vvv_images: int
    pool_images: int  # distinct generated images behind the e2e inputs (hard-linked to N names)
    warmup: int
    timed_s: float  # per timed configuration (at least min_iters iterations)
    min_iters: int
    caps: dict[str, float]  # step -> at most this many seconds
    e2e_overhead_s: float  # Ray start + model load, for fitting the e2e image count


GPU_CAPS = {"clip_image_scores": 60, "winclip_windows": 30, "fade_zero_shot": 35, "april_gan_518": 40,
            "sam_vit_h_encoder": 45, "jpeg_decode": 20, "e2e_default": 110, "e2e_vvv": 100, "e2e_vvv_fused": 100}
DRY_CAPS = {"clip_image_scores": 20, "winclip_windows": 20, "fade_zero_shot": 20, "april_gan_518": 20,
            "sam_vit_h_encoder": 20, "jpeg_decode": 20, "e2e_default": 120, "e2e_vvv": 120, "e2e_vvv_fused": 120}

def settings(args: argparse.Namespace) -> Settings:
    device = args.device
    if device == "auto":
        device = "cpu" if args.dry_run else ("cuda" if cuda_available() else "cpu")
    if args.dry_run:
        return Settings(
            dry_run=True, device=device, clip_models=("zsad-tiny",), clip_batches=(2, 4), precisions=("fp32", "bf16"),
            stage_precisions=("fp32",), stage_batch=args.stage_batch or 4, image_size=args.image_size or 128,
            sam_model="tiny", sam_batches=(1, 2), e2e_images=args.e2e_images or 8, vvv_images=args.vvv_images or 4,
            pool_images=4, warmup=1, timed_s=0.2, min_iters=2, caps=dict(DRY_CAPS), e2e_overhead_s=20.0)
    cuda = device == "cuda"
    return Settings(
        dry_run=False, device=device, clip_models=("ViT-B-16-plus-240", "ViT-L-14-336"), clip_batches=(64, 256),
        precisions=("fp32", "bf16"), stage_precisions=("bf16", "fp32") if cuda else ("fp32",),
        stage_batch=args.stage_batch, image_size=args.image_size or 512, sam_model="vit_h", sam_batches=(1, 8),
        e2e_images=args.e2e_images or 2000, vvv_images=args.vvv_images or 200, pool_images=32, warmup=2,
        timed_s=args.timed_s, min_iters=3, caps=dict(GPU_CAPS), e2e_overhead_s=45.0)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ helpers


class StepTimeout(BaseException):
    """A step ran past its time budget (a BaseException, so that no ``except Exception`` on the way,
    in this script or in the pipeline, mistakes it for the step's own failure)."""


class StepError(Exception):
    """A step could not run; the message says why."""


@contextlib.contextmanager
def alarm(seconds: float | None):
    """Raise :class:`StepTimeout` in this (main) thread after ``seconds`` (an in-process step's cap)."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise StepTimeout(f"the step ran past its time budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def require(*modules: str) -> None:
    """Fail the step with one clear message when a package it needs is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise StepError(f"missing package(s) on this machine: {', '.join(missing)}")


def describe(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"missing package {exc.name!r} (ModuleNotFoundError: {exc})"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:1500]}" if text else type(exc).__name__


def version(dist: str, *more: str) -> str | None:
    for name in (dist, *more):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda" and "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


def timed(fn: Callable[[], Any], cfg: Settings, deadline: float) -> dict[str, Any]:
    """Warm up, then time ``fn`` (synchronised around each call) for up to ``cfg.timed_s`` seconds
    (at least ``cfg.min_iters`` calls, fewer only when the step's deadline comes first). Returns
    iters, mean_s (the mean per call), min_s, warmup_s."""
    t = time.perf_counter()
    for i in range(cfg.warmup):
        fn()
        sync(cfg.device)
        if time.perf_counter() - t > 2.0:  # a slow configuration: one warm-up call is enough
            break
    warmup_s = time.perf_counter() - t
    times: list[float] = []
    end = time.monotonic() + cfg.timed_s
    while True:
        t = time.perf_counter()
        fn()
        sync(cfg.device)
        times.append(time.perf_counter() - t)
        now = time.monotonic()
        if now >= deadline - times[-1]:
            break
        if len(times) >= cfg.min_iters and now >= end:
            break
    return {"iters": len(times), "mean_s": sum(times) / len(times), "min_s": min(times), "warmup_s": round(warmup_s, 3)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch.utils.flop_counter.FlopCounterMode counts them (matrix
    products, convolutions, and the attention kernels it knows)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def row(model: str, batch: int | None, precision: str, timing: dict | None = None, *, images: int | None = None,
        flops_per_image: int | None = None, notes: str = "", **extra: Any) -> dict[str, Any]:
    """One result row: images/s = images per call / mean seconds per call."""
    out: dict[str, Any] = {"status": "ok", "model": model, "batch": batch, "precision": precision, "notes": notes}
    if timing is not None:
        per_call = images if images is not None else batch
        ips = per_call / timing["mean_s"]
        rounded = {k: round(v, 5) if isinstance(v, float) else v for k, v in timing.items()}
        out.update(images_per_s=round(ips, 3), **rounded)
        if flops_per_image:
            out.update(flops_per_image=flops_per_image, tflops=round(flops_per_image * ips / 1e12, 4))
        else:
            out["tflops"] = None
    out.update(extra)
    return out


def failed_row(model: str, batch: int | None, precision: str, status: str, why: str) -> dict[str, Any]:
    return {"status": status, "model": model, "batch": batch, "precision": precision, "images_per_s": None,
            "tflops": None, "notes": f"{status}: {why}"}


def step_status(rows: list[dict], timed_out: bool = False) -> str:
    """ok (every row ok), partial (some), error (none), or timeout (none, and the step ran out of time)."""
    ok = sum(r["status"] == "ok" for r in rows)
    if timed_out:
        return "partial" if ok else "timeout"
    if not rows or not ok:
        return "error"
    return "ok" if ok == len(rows) else "partial"


def stop_run(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a `zsad run` we started: SIGINT (it shuts its Ray down), then SIGKILL its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the run's own (start_new_session)
    proc.wait()




#: a step: (function(suite, record, deadline), runs in this process (an alarm enforces its cap), minimum seconds)
StepEntry = tuple[Callable[["Suite", dict, float], None], bool, float]


# ------------------------------------------------------------------------------------------ the suite


class Suite:
    """The suite's state: settings, budget, the step records written after every step, the e2e runs
    started ahead of their step; ``table``: step name -> (function(suite, record, deadline), runs in this
    process (an alarm enforces its cap), minimum seconds)."""

    def __init__(self, args: argparse.Namespace, cfg: Settings, table: dict[str, StepEntry]) -> None:
        self.args, self.cfg, self.table = args, cfg, table
        self.t0 = time.monotonic()
        self.budget_s = float(args.budget_s)
        self.out_dir = Path(args.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.keep_work = args.keep_work is not None
        self.work = Path(args.keep_work or tempfile.mkdtemp(prefix="zsad-gpu-suite-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.steps: list[dict[str, Any]] = []
        self.wanted: list[str] = list(table)  # the steps this suite runs (main sets them)
        self.launched: dict[str, dict[str, Any]] = {}  # e2e runs started ahead of their step (--dry-run)
        self.header = self._header()

    @property
    def cuda(self) -> bool:
        return self.cfg.device == "cuda"

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def step(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.steps if s["step"] == name), None)

    # -------------------------------------------------------------- header: machine and versions
    def _header(self) -> dict[str, Any]:
        from _machine import cpu_name

        device: dict[str, Any] = {"kind": self.cfg.device, "cpu": cpu_name(), "cpu_count": os.cpu_count()}
        try:
            device["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        except (ValueError, OSError, AttributeError):
            pass
        torch_info: dict[str, Any] = {}
        try:
            import torch

            torch_info = {"num_threads": torch.get_num_threads(),
                          "float32_matmul_precision": torch.get_float32_matmul_precision(),
                          "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
            if self.cuda:
                props = torch.cuda.get_device_properties(0)
                device.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                              memory_gib=round(props.total_memory / 2**30, 1), count=torch.cuda.device_count(),
                              bf16_supported=torch.cuda.is_bf16_supported())
            else:
                device["name"] = device["cpu"]
            cuda_v = torch.version.cuda
            cudnn_v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        except Exception as exc:  # noqa: BLE001 - no torch, or a device that does not answer: the steps will say
            device.setdefault("name", device["cpu"])
            device["error"] = describe(exc)
            cuda_v = cudnn_v = None
        versions = {"python": platform.python_version(), "torch": version("torch"), "cuda": cuda_v, "cudnn": cudnn_v,
                    "open_clip": version("open_clip_torch", "open-clip-torch"), "ray": version("ray"),
                    "segment_anything": version("segment_anything", "segment-anything"), "numpy": version("numpy"),
                    "pyarrow": version("pyarrow"), "pydantic": version("pydantic")}
        return {"device": device, "versions": versions, "torch_settings": torch_info}

    # -------------------------------------------------------------- running one step
    def run(self, name: str) -> None:
        fn, in_process, min_s = self.table[name]
        rec: dict[str, Any] = {"step": name, "status": None, "rows": [], "seconds": 0.0}
        self.steps.append(rec)  # filled in below (and written as it stands if the suite is interrupted)
        left = self.remaining()
        if left < min_s:
            rec.update(status="skipped", reason=f"suite budget: {max(left, 0):.0f} s left of --budget-s "
                                                f"{self.budget_s:.0f}, the step needs at least {min_s} s")
        else:
            limit = min(self.cfg.caps[name], left)
            rec["limit_s"] = round(limit, 1)
            deadline = time.monotonic() + limit
            t = time.monotonic()
            print(f"[gpu_suite] {name}: starting (at most {limit:.0f} s)", file=sys.stderr, flush=True)
            if self.cuda and "torch" in sys.modules:
                sys.modules["torch"].cuda.reset_peak_memory_stats()
            try:
                with alarm(limit if in_process else None):
                    fn(self, rec, deadline)
                rec["status"] = step_status(rec["rows"])
                if rec["status"] == "error" and "error" not in rec:
                    rec["error"] = "no configuration of the step ran"
            except StepTimeout as exc:
                rec.update(status=step_status(rec["rows"], timed_out=True), error=str(exc))
            except KeyboardInterrupt:
                rec.update(status="interrupted", error="interrupted (Ctrl-C)")
                raise
            except Exception as exc:  # noqa: BLE001 - one failing step must not stop the suite
                rec.update(status="error", error=describe(exc),
                           traceback=traceback.format_exc()[-3000:])
            finally:
                rec["seconds"] = round(time.monotonic() - t, 2)
                if self.cuda and "torch" in sys.modules:
                    peak = sys.modules["torch"].cuda.max_memory_allocated()
                    rec["cuda_max_memory_allocated_gib"] = round(peak / 2**30, 2)
                free_memory(self.cfg.device)
        extra = f": {rec.get('error') or rec.get('reason')}" if rec["status"] != "ok" else ""
        print(f"[gpu_suite] {name}: {rec['status']} in {rec['seconds']} s{extra}", file=sys.stderr, flush=True)
        self.write()

    # -------------------------------------------------------------- outputs
    def document(self) -> dict[str, Any]:
        return {
            "suite": "benchmarks/gpu_suite.py",
            "dry_run": self.cfg.dry_run,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            **self.header,
            "budget_s": self.budget_s,
            "wall_s": round(time.monotonic() - self.t0, 2),
            "settings": {k: v for k, v in dataclasses.asdict(self.cfg).items()},
            "random_weights": True,
            "steps": self.steps,
        }

    def markdown(self) -> str:
        h, v = self.header["device"], self.header["versions"]
        dev = h.get("name", "?") + (f" ({h.get('memory_gib')} GiB)" if h.get("memory_gib") else "")
        title = (f"GPU suite, {dt.date.today().isoformat()}: {dev}, {h.get('cpu_count')} CPU cores; torch {v['torch']}"
                 f" (CUDA {v['cuda']}), open_clip {v['open_clip']}, ray {v['ray']}")
        lines = [f"<!-- benchmarks/gpu_suite.py: `{self.document()['command']}` -->", "", f"**{title}**"]
        if self.cfg.dry_run:
            lines.append("DRY RUN: tiny models on the CPU; these numbers check the suite, they are not benchmarks.")
        lines += [("Random weights throughout (time does not depend on the weight values; no accuracy is measured). "
                   f"Generated {self.cfg.image_size} px images."), "",
                  "| step | model | batch | precision | images/s | TFLOP/s | notes |", "|---|---|---|---|---|---|---|"]
        for s in self.steps:
            if not s["rows"]:
                why = s.get("error") or s.get("reason") or ""
                lines.append(f"| {s['step']} | - | - | - | - | - | {s['status']}: {_cell(why)} |")
                continue
            for r in s["rows"]:
                lines.append(f"| {s['step']} | {_cell(r['model'])} | {r['batch'] if r['batch'] is not None else '-'} | "
                             f"{r['precision']} | {fmt_num(r.get('images_per_s'))} | {fmt_num(r.get('tflops'))} | "
                             f"{_cell(r.get('notes', ''))} |")
            if s["status"] not in ("ok",):
                lines.append(f"| {s['step']} | - | - | - | - | - | {s['status']}: {_cell(s.get('error') or '')} |")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        (self.out_dir / "gpu_suite.json").write_text(json.dumps(self.document(), indent=1, default=str))
        (self.out_dir / "gpu_suite.md").write_text(self.markdown())

    def close(self) -> None:
        for launched in self.launched.values():  # started ahead of a step that did not run (interrupted)
            stop_run(launched["proc"], grace_s=5)
            launched["log"].close()
        self.launched.clear()
        if not self.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:400]
