"""The GPU suite's in-process steps (benchmarks/gpu_suite.py): open_clip's image tower and SAM's
encoder (micro), and the three CLIP stages driven as a run does per batch (stage steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from gpu_suite_base import (  # benchmarks/ is on sys.path when the suite runs as a script
    RANDOM,
    REPO,
    Settings,
    Suite,
    count_flops,
    describe,
    failed_row,
    free_memory,
    require,
    row,
    timed,
)

# the stage steps: preset, their own overrides, and the tiny overrides of --dry-run (as the tests')
STAGE_PRESETS: dict[str, tuple[str, list[str], list[str]]] = {
    "winclip_windows": ("winclip.yaml", [], ["clip.model=zsad-tiny"]),
    "fade_zero_shot": ("default.yaml", [], ["clip.model=zsad-tiny", "pixel.scales=[64]", "pixel.grid=8",
                                             "pixel.gem_depth=2"]),
    "april_gan_518": ("aprilgan.yaml", ["pixel.weights=null"], ["clip.model=zsad-tiny", "pixel.layers=[2,4,6,8]",
                                                                 "pixel.image_size=128"]),
}


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
        text = scoring.build_classifier(torch.randn(7, dim, generator=g).to(device),
                                        torch.randn(4, dim, generator=g).to(device), "mean_norm_renorm")
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
        _time_precisions(rec, label, batch, cfg, deadline, lambda p, x=x: partial(_sam_encode, enc, x, device, p),
                         flops, build_s, "image encoder forward only, input already on the device; FLOPs: "
                                         "FlopCounterMode, one batch-1 forward")
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


def step_jpeg_decode(suite: Suite, rec: dict, deadline: float) -> None:
    """decode.device: model's decoder (pipeline.models.device_decode.DeviceDecoder) on the suite's
    device against the CPU decode stage's decode_working, on generated 12-MP JPEGs (the dry run: 0.3 MP),
    both to jobs/default.yaml's working size."""
    require("torch", "torchvision", "PIL")
    import io

    from bench_feed import camera_like  # benchmarks/ is on sys.path
    from PIL import Image

    from pipeline.config import load_spec
    from pipeline.io.images import decode_working
    from pipeline.models.device_decode import DeviceDecoder
    from pipeline.stages.decode import working_size

    cfg = suite.cfg
    h, w = (480, 640) if cfg.dry_run else (3000, 4000)
    buf = io.BytesIO()
    Image.fromarray(camera_like(h, w, seed=0)).save(buf, "JPEG", quality=90)  # bench_feed's images
    data = buf.getvalue()
    spec = load_spec(str(REPO / "jobs" / "default.yaml"), ["decode.resolution=working"])
    need, limit = working_size(spec), spec.decode.max_pixels
    what = f"{w} x {h} JPEG ({len(data) / 1e6:.1f} MB) -> default's working size"
    for batch in (1, 8):
        decoder = DeviceDecoder(cfg.device, limit, need)
        label = f"JPEG decode on {cfg.device} (torchvision decode_jpeg), {what}"
        try:
            timing = timed(partial(decoder.decode, [data] * batch), cfg, deadline)
            assert decoder.refused == 0, decoder.last_refusal
        except Exception as exc:  # noqa: BLE001
            rec["rows"].append(failed_row(label, batch, "uint8", "error", describe(exc)))
            continue
        rec["rows"].append(row(label, batch, "uint8", timing, notes="the model actor's decode of decode.device: "
                               "model: decode, EXIF turn, resize on the device, copy to the host"))
    label = f"JPEG decode on the CPU (Pillow draft + bicubic, one thread), {what}"
    try:
        timing = timed(lambda: decode_working(data, limit, need), cfg, deadline)
    except Exception as exc:  # noqa: BLE001
        rec["rows"].append(failed_row(label, 1, "uint8", "error", describe(exc)))
        return
    rec["rows"].append(row(label, 1, "uint8", timing, notes="the decode stage's decode of decode.device: cpu"))


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
