"""One-GPU benchmark suite: model throughput (micro) and `zsad run` end to end, in one script.

Random weights throughout (the pretrained ones cannot be downloaded on the benchmark machines; time
does not depend on the weight values; no accuracy is measured or implied). Generated images.

Steps (each in its own try/except: a failing step records its error and the suite goes on):

  clip_image_scores  open_clip ViT-B-16-plus-240 and ViT-L-14-336 at batch 64 and 256, fp32 and bf16
                     (autocast): model forward only (pipeline.models.clip.encode_image on a batch
                     already on the device, plus the fp32 anomaly probability against a text
                     classifier); TFLOP/s from FlopCounterMode on one batch-1 forward
  winclip_windows    jobs/winclip.yaml's stage (ViT-B-16-plus-240, windows of 2 and 3 patches)
  fade_zero_shot     jobs/default.yaml's stage (FADE: GEM maps at 240/448/896, grid 56, vision map)
  april_gan_518      jobs/aprilgan.yaml's stage (ViT-L-14-336 at 518 px, layers 6/12/18/24, random
                     adapters)
                     The three stage steps drive pipeline.stages.clip_score.ClipScoreStage as a run
                     does per batch: score_images() on uint8 images on the host (preprocess +
                     forward + maps), at the preset's batch size, in bf16 and fp32.
  sam_vit_h_encoder  SAM vit_h's image encoder at 1024 px, batch 1 and 8, fp32 and bf16 (autocast),
                     TFLOP/s from FlopCounterMode on one batch-1 forward; plus SamEngine.embed on one
                     image (host resize + normalise + encoder: what the foreground stage does per image)
  e2e_default        `zsad run jobs/default.yaml` (CLI subprocess, local Ray) on --e2e-images generated
                     PNGs (fewer when the FADE stage's rate says they would not fit the step's time)
  e2e_vvv            `zsad run jobs/vvv.yaml` (SAM vit_h automatic masks, 32 x 32 points) on
                     --vvv-images generated multi-object PNGs
  e2e_vvv_fused      the same run with runtime.fuse_models: true (SAM foreground, tiling and CLIP in one
                     actor pool) on the same images: separate pools against one fused pool
                     e2e images/s = counts.images / run.json wall_seconds (which includes Ray's start);
                     the notes add the steady rate (after the first result) and the CLIP (and SAM)
                     actors' own. Precision: the presets' default (auto: bf16 on a GPU), recorded as
                     auto resolves on the suite's device (run.json records only the spec's value).

The whole suite has a wall-clock budget (--budget-s, default 480): each step has its own cap and
gets at most what is left; a step that cannot start in what is left is skipped with the reason.
Results are written after every step: OUT_DIR/gpu_suite.json (per-step results, device, versions,
date) and OUT_DIR/gpu_suite.md (BENCHMARKS.md-ready table rows, also printed to stdout); the e2e
runs' logs and run.json go to OUT_DIR/e2e/.

--dry-run runs every step, through the same functions, with tiny models on the CPU (the CLIP config
zsad-tiny, the SAM `tiny`, tiny batches, a handful of small images, the e2e presets with the tests'
tiny overrides) in under a minute: it checks the suite, its numbers are not benchmarks. Its e2e
runs start together (each with its own local Ray) and are collected step by step; on a GPU they
run one after another, so that each has the machine to itself.

Usage:
  python benchmarks/gpu_suite.py --out-dir OUT [--budget-s 480] [--e2e-images 2000] [--vvv-images 200]
      [--steps clip_image_scores,...] [--image-size 512] [--stage-batch N] [--timed-s 3]
      [--device auto|cuda|cpu] [--keep-work DIR]
  python benchmarks/gpu_suite.py --dry-run --out-dir OUT
On the one-GPU machine (the repository root as the working directory; zsad need not be installed):
  PYTHONPATH=$PWD python3 benchmarks/gpu_suite.py --out-dir $OUT/gpu_suite --budget-s 450
The exit code is 0 whatever the steps did (their status is in the JSON); 2 for bad usage.
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
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # pipeline, whatever the cwd (the package need not be installed)
sys.path.insert(0, str(REPO / "benchmarks"))  # _machine

RANDOM = ["clip.weights=null", "allow_random_weights=true"]
PROGRESS = re.compile(r"progress: (\d+)/(\d+) images \(\d+%\), ([\d.]+) images/s")


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
            "sam_vit_h_encoder": 45, "e2e_default": 110, "e2e_vvv": 100, "e2e_vvv_fused": 100}
DRY_CAPS = {"clip_image_scores": 20, "winclip_windows": 20, "fade_zero_shot": 20, "april_gan_518": 20,
            "sam_vit_h_encoder": 20, "e2e_default": 120, "e2e_vvv": 120, "e2e_vvv_fused": 120}

# the stage steps: preset, their own overrides, and the tiny overrides of --dry-run (as the tests')
STAGE_PRESETS: dict[str, tuple[str, list[str], list[str]]] = {
    "winclip_windows": ("winclip.yaml", [], ["clip.model=zsad-tiny"]),
    "fade_zero_shot": ("default.yaml", [], ["clip.model=zsad-tiny", "pixel.scales=[64]", "pixel.grid=8",
                                             "pixel.gem_depth=2"]),
    "april_gan_518": ("aprilgan.yaml", ["pixel.weights=null"], ["clip.model=zsad-tiny", "pixel.layers=[2,4,6,8]",
                                                                 "pixel.image_size=128"]),
}

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


def settings(args: argparse.Namespace) -> Settings:
    device = args.device
    if device == "auto":
        device = "cpu" if args.dry_run else ("cuda" if _cuda_available() else "cpu")
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


def _cuda_available() -> bool:
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
        out.update(images_per_s=round(ips, 3), **{k: round(v, 5) if isinstance(v, float) else v for k, v in timing.items()})
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


# ------------------------------------------------------------------------------------------ the suite


class Suite:
    def __init__(self, args: argparse.Namespace, cfg: Settings) -> None:
        self.args, self.cfg = args, cfg
        self.t0 = time.monotonic()
        self.budget_s = float(args.budget_s)
        self.out_dir = Path(args.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.keep_work = args.keep_work is not None
        self.work = Path(args.keep_work or tempfile.mkdtemp(prefix="zsad-gpu-suite-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.steps: list[dict[str, Any]] = []
        self.wanted: list[str] = list(STEPS)  # the steps this suite runs (main sets them)
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
            cuda_v, cudnn_v = torch.version.cuda, torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
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
        fn, in_process, min_s = STEP_TABLE[name]
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
                    rec["cuda_max_memory_allocated_gib"] = round(sys.modules["torch"].cuda.max_memory_allocated() / 2**30, 2)
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
                             f"{r['precision']} | {_num(r.get('images_per_s'))} | {_num(r.get('tflops'))} | "
                             f"{_cell(r.get('notes', ''))} |")
            if s["status"] not in ("ok",):
                lines.append(f"| {s['step']} | - | - | - | - | - | {s['status']}: {_cell(s.get('error') or '')} |")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        (self.out_dir / "gpu_suite.json").write_text(json.dumps(self.document(), indent=1, default=str))
        (self.out_dir / "gpu_suite.md").write_text(self.markdown())

    def close(self) -> None:
        for launched in self.launched.values():  # started ahead of a step that did not run (interrupted)
            _stop(launched["proc"], grace_s=5)
            launched["log"].close()
        self.launched.clear()
        if not self.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:400]


# ------------------------------------------------------------------------------------------ micro steps


def _clip_scores(model, x, text, device: str, precision: str):
    """One batch's image scores: the image tower under autocast, the score in fp32 (as the stage)."""
    import torch

    from pipeline.models import clip as clip_models
    from pipeline.models import precision as prec
    from pipeline.models import scoring

    with torch.inference_mode():
        with prec.autocast(device, precision):
            feats = clip_models.encode_image(model, x)
        return scoring.anomaly_probability(feats, text, 0.01)


def _sam_encode(encoder, x, device: str, precision: str):
    import torch

    from pipeline.models import precision as prec

    with torch.inference_mode(), prec.autocast(device, precision):
        return encoder(x)


def step_clip_image_scores(suite: Suite, rec: dict, deadline: float) -> None:
    """open_clip image tower + the image score, model forward only (the batch is already on the device)."""
    require("torch", "open_clip")
    import torch

    from pipeline.models import clip as clip_models
    from pipeline.models import scoring

    cfg, device = suite.cfg, suite.cfg.device
    for name in cfg.clip_models:
        if time.monotonic() > deadline - 1:
            rec["rows"].append(failed_row(f"{name} (random init)", None, "-", "skipped", "step budget used up"))
            continue
        t = time.perf_counter()
        model, pre = clip_models.build_clip(name, device=device)
        build_s = round(time.perf_counter() - t, 2)
        size = pre.size
        with torch.enable_grad():  # grad mode: open_clip's attention takes the unfused path FlopCounterMode sees
            x1 = torch.randn(1, 3, size, size, device=device)
            flops = count_flops(partial(model.encode_image, x1))
        dim = int(model.visual.output_dim)
        g = torch.Generator(device="cpu").manual_seed(0)
        text = scoring.build_classifier(torch.randn(7, dim, generator=g).to(device), torch.randn(4, dim, generator=g).to(device),
                                        "mean_norm_renorm")
        for batch in cfg.clip_batches:
            x = torch.randn(batch, 3, size, size, device=device)
            _time_precisions(rec, f"{name} (random init, {size} px)", batch, cfg, deadline,
                             lambda p, m=model, x=x: partial(_clip_scores, m, x, text, device, p), flops, build_s,
                             "model forward only: encode_image + fp32 score, input already on the device; FLOPs: "
                             "FlopCounterMode, one batch-1 forward")
            del x
        del model
        free_memory(device)


def _time_precisions(rec: dict, label: str, batch: int, cfg: Settings, deadline: float, call: Callable[[str], Callable],
                     flops: int, build_s: float, notes: str) -> None:
    """One row per precision of ``cfg.precisions``: ``call(precision)`` timed (skipped once the step's
    time is used up; an error, e.g. out of memory at one batch size, fails that row only)."""
    for p in cfg.precisions:
        if time.monotonic() > deadline - 1:
            rec["rows"].append(failed_row(label, batch, p, "skipped", "step budget used up"))
            continue
        try:
            timing = timed(call(p), cfg, deadline)
        except Exception as exc:  # noqa: BLE001 - the other configurations still run
            rec["rows"].append(failed_row(label, batch, p, "error", describe(exc)))
            free_memory(cfg.device)
            continue
        rec["rows"].append(row(label, batch, p, timing, flops_per_image=flops, build_s=build_s, notes=notes))


def step_sam_encoder(suite: Suite, rec: dict, deadline: float) -> None:
    """SAM's image encoder on a device batch, and SamEngine.embed on one host image."""
    require("torch", "segment_anything")
    import numpy as np
    import torch

    from pipeline.models.sam import SamEngine, build_sam

    cfg, device = suite.cfg, suite.cfg.device
    t = time.perf_counter()
    sam = build_sam(cfg.sam_model, device=device)
    build_s = round(time.perf_counter() - t, 2)
    enc = sam.image_encoder
    size = int(enc.img_size)
    x1 = torch.randn(1, 3, size, size, device=device)
    with torch.inference_mode():
        flops = count_flops(partial(enc, x1))
    label = f"SAM {cfg.sam_model} image encoder (random init, {size} px)"
    for batch in cfg.sam_batches:
        x = torch.randn(batch, 3, size, size, device=device)
        _time_precisions(rec, label, batch, cfg, deadline, lambda p, x=x: partial(_sam_encode, enc, x, device, p), flops,
                         build_s, "image encoder forward only, input already on the device; FLOPs: FlopCounterMode, "
                                  "one batch-1 forward")
        del x
    image = np.random.default_rng(0).integers(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    for p in cfg.precisions:
        engine = SamEngine(sam, precision=p)
        elabel = f"SAM {cfg.sam_model} SamEngine.embed ({cfg.image_size} px image)"
        if time.monotonic() > deadline - 1:
            rec["rows"].append(failed_row(elabel, 1, engine.precision, "skipped", "step budget used up"))
            continue
        try:
            timing = timed(partial(engine.embed, image), cfg, deadline)
        except Exception as exc:  # noqa: BLE001
            rec["rows"].append(failed_row(elabel, 1, engine.precision, "error", describe(exc)))
            continue
        rec["rows"].append(row(elabel, 1, engine.precision, timing, flops_per_image=flops,
                               notes="what the foreground stage does per image: host resize (ResizeLongestSide) + "
                                     "normalise + pad + encoder; TFLOP/s from the encoder's FLOPs"))


# ------------------------------------------------------------------------------------------ stage steps


def step_stage(key: str) -> Callable[[Suite, dict, float], None]:
    def run(suite: Suite, rec: dict, deadline: float) -> None:
        require("torch", "open_clip", "pydantic", "yaml", "PIL")
        import numpy as np

        from pipeline.config import load_spec
        from pipeline.stages.clip_score import ClipScoreStage

        cfg = suite.cfg
        job, own, tiny = STAGE_PRESETS[key]
        sets = RANDOM + own + (tiny if cfg.dry_run else [])
        spec = load_spec(str(REPO / "jobs" / job), sets)
        batch = cfg.stage_batch or spec.resources.clip_score.batch_size
        batch_from = ("--stage-batch" if suite.args.stage_batch else "the dry run's" if cfg.dry_run
                      else "the preset's resources.clip_score")
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8) for _ in range(batch)]
        categories = ["widget"] * batch
        model = spec.clip.model
        if spec.pixel.kind == "april_gan":
            model += f" @{spec.pixel.image_size} px, layers {'/'.join(map(str, spec.pixel.layers))}, random adapters"
        elif spec.pixel.kind == "fade_zero_shot":
            model += f", scales {'/'.join(map(str, spec.pixel.scales))}, grid {spec.pixel.grid}"
        elif spec.pixel.kind == "winclip_windows":
            model += f", windows {'/'.join(map(str, spec.pixel.window_sizes))}"
        rec["preset"] = f"jobs/{job}"
        rec["sets"] = sets
        shared = None  # the first precision's model, reused by the next (weights stay fp32 either way)
        results: dict[str, tuple[dict, dict]] = {}  # precision that ran -> (its row, score_images on the images)
        for p in cfg.stage_precisions + (("bf16",) if cfg.dry_run else ()):  # the dry run checks the comparison too
            if time.monotonic() > deadline - 2:
                rec["rows"].append(failed_row(model, batch, p, "skipped", "step budget used up"))
                continue
            spec_p = load_spec(str(REPO / "jobs" / job), sets + [f"clip.precision={p}"])
            factory = None if shared is None else (lambda m=shared: m)
            stage = ClipScoreStage(spec_p.clip, spec_p.score, pixel=spec_p.pixel, maps=spec_p.maps, use_gpu=suite.cuda,
                                   map_range=spec_p.map_range(), model_factory=factory)
            t = time.perf_counter()
            try:
                stage.setup()
                setup_s = round(time.perf_counter() - t, 2)
                if shared is None:
                    shared = (stage.model, stage.preprocess)
                timing = timed(partial(stage.score_images, images, categories), cfg, deadline)
            except Exception as exc:  # noqa: BLE001
                rec["rows"].append(failed_row(model, batch, p, "error", describe(exc)))
                free_memory(cfg.device)
                continue
            rec["rows"].append(row(model, batch, stage.precision, timing, setup_s=setup_s, device=str(stage.device),
                                   notes=f"stage: ClipScoreStage.score_images on {cfg.image_size} px uint8 host images "
                                         f"(preprocess + forward + score + maps at {spec.maps.map_size} px), "
                                         f"jobs/{job} settings, batch: {batch_from}"))
            results[stage.precision] = (rec["rows"][-1], stage.score_images(images, categories))
            del stage
        del shared
        if "fp32" in results:  # the low precisions against fp32 on the same images (README "GPU execution")
            ref = results["fp32"][1]
            for p, (r, out) in results.items():
                if p == "fp32":
                    continue
                d_score = float(np.abs(out["score"] - ref["score"]).max())
                d_map = max((float(np.abs(a - b).max()) for a, b in zip(out["maps"], ref["maps"])), default=None)
                lo, hi = spec.map_range()
                r["deviation_vs_fp32"] = {"score_max_abs": d_score, "map_max_abs": d_map, "map_range": [lo, hi]}
                r["notes"] += (f"; vs fp32 on the same images: score max |d| {d_score:.2e}, map max |d| "
                               f"{'-' if d_map is None else f'{d_map:.2e}'} (map range [{lo:g}, {hi:g}])")

    return run


# ------------------------------------------------------------------------------------------ e2e steps


def _pool(suite: Suite, kind: str, n: int, size: int) -> tuple[str, list[Path]]:
    """Generate ``n`` distinct images once per suite: (category, PNG paths)."""
    from pipeline.synthetic import make_dataset, make_multi_instance_dataset

    root = suite.work / f"pool-{kind}-{size}"
    if kind == "objects":  # single objects with defects (MVTec-like)
        category = "widget"
        if not root.exists():
            make_dataset(str(root), categories=(category,), n_good=n // 2, n_bad=n - n // 2, n_train=0, size=size, seed=0)
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


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
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
            if cfg.dry_run:  # the dry run starts its e2e runs together: they check the paths, their times are not figures
                for other in suite.wanted:
                    if other in E2E_PRESETS and other != key and other not in suite.launched and suite.step(other) is None:
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
                _stop(proc)
                rc = proc.returncode
            except BaseException:
                _stop(proc, grace_s=5)
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
                what += f" (progress then: {part['images_done']}/{part['images_total']} images, {part['images_per_s']} images/s)"
                rec["rows"].append({**failed_row(f"jobs/{preset['job']}", spec.resources.clip_score.batch_size,
                                                 f"clip {spec.clip.precision}", "timeout" if timed_out else "error", what),
                                    "images_per_s": part["images_per_s"]})
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
        e2e.update(images_scored=int(counts["ok"]), counts=counts, run_status=record["status"], reason=record.get("reason"),
                   wall_seconds=wall, stage_seconds=st, first_result_rows=done_first, images_per_s=round(images / wall, 3),
                   images_per_s_steady=steady, stage_images_per_s=busy,
                   precision_spec={"clip": clip_p, **({"sam": spec.sam.precision} if spec.uses_sam() else {})},
                   precision_recorded=_run_json_precision(record) or None,
                   ray_resources=(record.get("ray") or {}).get("resources"))
        where = "local Ray" if spec.runtime.executor == "ray" else "in-process executor, no Ray"
        notes = (f"zsad run (CLI, {where}), {images} x {cfg.image_size} px PNG ({len(pool)} distinct), asked {asked}; "
                 f"images / run.json wall_seconds {wall:.1f} s (incl. Ray start; first result at {first} s); "
                 f"steady {_num(steady)}/s; own rate of the CLIP actor {_num(busy.get('clip_score'))}/s"
                 + (f", SAM foreground actor {_num(busy.get('foreground'))}/s" if "foreground" in busy else "")
                 + ("; runtime.fuse_models: one actor pool for foreground..clip_score" if spec.runtime.fuse_models else "")
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


# ------------------------------------------------------------------------------------------ main

# step -> (function(suite, record, deadline), runs in this process (an alarm enforces its cap), minimum seconds)
STEP_TABLE: dict[str, tuple[Callable[[Suite, dict, float], None], bool, float]] = {
    "clip_image_scores": (step_clip_image_scores, True, 10),
    "winclip_windows": (step_stage("winclip_windows"), True, 8),
    "fade_zero_shot": (step_stage("fade_zero_shot"), True, 8),
    "april_gan_518": (step_stage("april_gan_518"), True, 10),
    "sam_vit_h_encoder": (step_sam_encoder, True, 10),
    "e2e_default": (step_e2e("e2e_default"), False, 50),
    "e2e_vvv": (step_e2e("e2e_vvv"), False, 50),
    "e2e_vvv_fused": (step_e2e("e2e_vvv_fused"), False, 50),
}
STEPS = tuple(STEP_TABLE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "gpu_suite_out"),
                    help="where gpu_suite.json, gpu_suite.md and the e2e logs go (default benchmarks/gpu_suite_out)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="wall-clock budget of the whole suite; steps that no longer fit are skipped (default 480)")
    ap.add_argument("--dry-run", action="store_true", help="every step with tiny models on the CPU (< 1 minute)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when available (cpu with --dry-run)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of: {', '.join(STEPS)}")
    ap.add_argument("--e2e-images", type=int, default=None,
                    help="images for e2e_default (default 2000; 8 with --dry-run); fewer when they would not fit")
    ap.add_argument("--vvv-images", type=int, default=None, help="images for e2e_vvv (default 200; 4 with --dry-run)")
    ap.add_argument("--image-size", type=int, default=None, help="side of the generated images (default 512; 128 dry)")
    ap.add_argument("--stage-batch", type=int, default=None,
                    help="batch of the stage steps (default: each preset's resources.clip_score.batch_size; 4 dry)")
    ap.add_argument("--timed-s", type=float, default=3.0, help="seconds timed per micro configuration (default 3)")
    ap.add_argument("--e2e-executor", choices=("ray", "local"), default="ray",
                    help="what runs the e2e steps' zsad runs: ray (default: a local Ray each, what the figures are of) or "
                         "local (the in-process executor: a quicker check of the suite's paths with --dry-run)")
    ap.add_argument("--keep-work", default=None, metavar="DIR",
                    help="generate inputs and run outputs in DIR and keep them (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.steps.split(",") if s and s not in STEP_TABLE]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    for name in ("e2e_images", "vvv_images", "image_size", "stage_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = settings(args)
    if cfg.device == "cuda" and not _cuda_available():
        print("[gpu_suite] --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    suite = Suite(args, cfg)
    wanted = suite.wanted = [s for s in STEPS if s in args.steps.split(",")]
    print(f"[gpu_suite] {'DRY RUN (tiny models) ' if cfg.dry_run else ''}on {suite.header['device'].get('name')} "
          f"({cfg.device}); budget {suite.budget_s:.0f} s; steps: {', '.join(wanted)}; output {suite.out_dir}",
          file=sys.stderr, flush=True)
    try:
        for name in wanted:
            suite.run(name)
    except KeyboardInterrupt:
        print("[gpu_suite] interrupted: writing what was measured", file=sys.stderr)
    finally:
        suite.write()
        suite.close()
    print(suite.markdown())
    print(f"[gpu_suite] wrote {suite.out_dir / 'gpu_suite.json'} and {suite.out_dir / 'gpu_suite.md'} "
          f"in {time.monotonic() - suite.t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
