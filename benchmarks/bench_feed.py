"""What it costs the CPUs to feed the GPUs (issue 31): per image, ms of CPU for read + decode +
resize to the model inputs + encode (map PNG, mask), and the bytes that travel from the decode
stage to the model stage, with ``decode.resolution`` exact against working, per preset, for
generated 2-, 5- and 12-megapixel JPEGs and PNGs. Also the CPU cores that would keep one GPU busy
at 200 images/s, and the deviation of working from exact on the preset's model inputs.

Everything is measured in this process, one thread (torch.set_num_threads(1)), with CPU time
(``time.process_time``), median of ``--repeats``:

- read: the file's bytes (``pipeline.io.fs.read_bytes``);
- decode: the decode stage's own function (``decode_image``, or ``decode_working`` with the preset's
  ``pipeline.stages.decode.working_size``);
- resize: the scoring stage's preprocessing of the decoded image to every input size the preset's
  model takes (``pipeline.models.clip.preprocess_images`` with the preset's ``clip.resize``: CLIP's
  size, FADE's scales, the adapters' or mutual scoring's ``pixel.image_size``); on a GPU worker the
  torch resize runs on the device, the PIL one (FADE's presets) on the CPU;
- encode: the encode stage on a map of the stored size (``maps.map_size``, from the original size:
  the same in both modes).

Bytes: the decoded array (the ``image`` tensor column between the stages: its Arrow buffer holds
the same H x W x 3 bytes). Deviation: max |working - exact| of the normalised model input at the
preset's largest size (what the model sees; its scores and maps follow from it).

``--device-decode cpu|cuda`` adds ``decode.device: model`` against ``cpu`` on the JPEGs
(:func:`device_decode_cost`): what the decode task still does (read + header), the bytes it ships,
and the model actor's decode time per image on that device.

Usage: .venv/bin/python benchmarks/bench_feed.py [--presets default musc_fast ...] [--sizes 2 5 12]
       [--repeats 3] [--json OUT] [--device-decode cuda --device-batch 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {2: (1224, 1632), 5: (1944, 2592), 12: (3000, 4000)}  # megapixels -> (height, width), 4:3
GPU_RATE = 200.0  # images/s one GPU is to be fed


def camera_like(height: int, width: int, seed: int) -> np.ndarray:
    """A generated photo-like image: smooth shading, edges and sensor-like noise (JPEG sizes like a
    camera's at quality 90)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    small = (rng.random((height // 64 + 2, width // 64 + 2, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, max(11, width // 12)))
        draw.ellipse((x - r, y - r, x + r, y + r), outline=tuple(int(v) for v in rng.integers(0, 255, 3)), width=6)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 4, (height, width, 3)).astype(np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def cpu_ms(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.process_time()
        out = fn()
        times.append((time.process_time() - t) * 1000.0)
    return statistics.median(times), out


def measure(preset: str, path: str, repeats: int) -> dict:
    import torch

    from pipeline.config import load_spec
    from pipeline.io.fs import read_bytes
    from pipeline.io.images import decode_image, decode_working
    from pipeline.models.clip import OPENAI_MEAN, OPENAI_STD, Preprocess, preprocess_images
    from pipeline.ops.heatmap import map_shape
    from pipeline.stages.decode import model_input_sizes, working_size
    from pipeline.stages.encode import EncodeStage

    rows = {}
    inputs = {}
    for mode in ("exact", "working"):
        spec = load_spec(str(ROOT / "jobs" / f"{preset}.yaml"), [f"decode.resolution={mode}"])
        need = working_size(spec)
        read, data = cpu_ms(lambda: read_bytes(path), repeats)
        if need is None:
            decode, image = cpu_ms(lambda: decode_image(data, spec.decode.max_pixels), repeats)
            original = image.shape[:2]
        else:
            decode, (image, original) = cpu_ms(lambda: decode_working(data, spec.decode.max_pixels, need), repeats)
        tensor = torch.from_numpy(image)
        sizes = model_input_sizes(spec)

        def resize_all():
            return {s: preprocess_images([tensor], Preprocess(size=s, mean=OPENAI_MEAN, std=OPENAI_STD,
                                                              resize=spec.clip.resize)) for s in sizes}

        resize, batches = cpu_ms(resize_all, repeats)
        inputs[mode] = batches[max(sizes)]
        shape = map_shape(original[0], original[1], spec.maps.map_size)
        the_map = np.random.default_rng(0).random(shape).astype(np.float32)
        stage = EncodeStage.from_spec(spec)
        maps = np.empty(1, dtype=object)
        maps[0] = the_map
        batch = {"anomaly_map": maps, "status": np.array(["ok"], dtype=object)}
        encode, _ = cpu_ms(lambda: stage(dict(batch)), repeats)
        total = read + decode + resize + encode
        rows[mode] = {"read_ms": round(read, 1), "decode_ms": round(decode, 1), "resize_ms": round(resize, 1),
                      "encode_ms": round(encode, 1), "total_ms": round(total, 1),
                      "cores_for_200_per_s": round(total * GPU_RATE / 1000.0, 1),
                      "bytes_to_model": int(image.nbytes), "decoded": list(image.shape[:2]), "inputs": sizes}
    diff = (inputs["working"] - inputs["exact"]).abs()
    return {**rows, "input_deviation": float(diff.max()), "input_deviation_mean": float(diff.mean()),
            "decode_gain": round(rows["exact"]["decode_ms"] / max(rows["working"]["decode_ms"], 1e-9), 2),
            "cpu_gain": round(rows["exact"]["total_ms"] / max(rows["working"]["total_ms"], 1e-9), 2),
            "bytes_gain": round(rows["exact"]["bytes_to_model"] / rows["working"]["bytes_to_model"], 1)}


def device_decode_cost(preset: str, path: str, device: str, repeats: int, batch: int) -> dict:
    """``decode.device: model`` against ``cpu`` (both ``decode.resolution: working``) for one file:
    the decode task's CPU ms per image (read + header probe, against read + decode), the bytes that
    travel to the model actor (the file, against the decoded pixels), and in the model actor, per
    image of a batch of ``batch`` copies decoded by :class:`pipeline.models.device_decode.DeviceDecoder`
    on ``device``: wall ms (synchronised on a GPU) and the actor's CPU ms."""
    import torch

    from pipeline.config import load_spec
    from pipeline.io.fs import read_bytes
    from pipeline.io.images import decode_working, probe
    from pipeline.models.device_decode import DeviceDecoder
    from pipeline.stages.decode import working_size

    spec = load_spec(str(ROOT / "jobs" / f"{preset}.yaml"), ["decode.resolution=working"])
    need, limit = working_size(spec), spec.decode.max_pixels
    task_cpu, (image, _) = cpu_ms(lambda: decode_working(read_bytes(path), limit, need), repeats)
    def fetch_and_probe():
        data = read_bytes(path)
        probe(data, limit)
        return data

    task_model, data = cpu_ms(fetch_and_probe, repeats)
    decoder = DeviceDecoder(device, limit, need)
    blobs = [data] * batch
    decoder.decode(blobs[:1])  # warm-up (CUDA context, nvJPEG handles)
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = decoder.decode(blobs)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        walls.append((time.perf_counter() - t) * 1000.0 / batch)
        cpus.append((time.process_time() - c) * 1000.0 / batch)
    assert decoder.refused == 0 and decoder.on_device == batch * repeats + 1, (decoder.refused, decoder.last_refusal)
    got = out[0]
    dev = np.abs(got.astype(np.int16) - image.astype(np.int16))
    return {"preset": preset, "device": str(decoder.device), "batch": batch, "decoded": list(got.shape[:2]),
            "task_ms_cpu_decode": round(task_cpu, 1), "task_ms_model_decode": round(task_model, 2),
            "bytes_cpu_decode": int(image.nbytes), "bytes_model_decode": len(data),
            "actor_wall_ms": round(statistics.median(walls), 1), "actor_cpu_ms": round(statistics.median(cpus), 1),
            "pixel_dev_mean": round(float(dev.mean()), 3), "pixel_dev_max": int(dev.max())}


def score_deviation(preset: str, n: int, scratch: str, sets: list[str] = ()) -> dict:
    """The preset's scoring stage on the real architecture with random weights (seeded), on ``n``
    generated 12-MP JPEGs decoded exact and working: max |difference| of the image scores and of
    the stored maps (maps.map_size), and the mean map difference."""
    from PIL import Image

    from pipeline.config import load_spec
    from pipeline.stages.clip_score import ClipScoreStage
    from pipeline.stages.decode import DecodeStage

    h, w = SIZES[12]
    uris = []
    for i in range(n):
        path = os.path.join(scratch, f"dev{i}.jpg")
        Image.fromarray(camera_like(h, w, seed=100 + i)).save(path, quality=90)
        uris.append(path)
    out = {}
    for mode in ("exact", "working"):
        spec = load_spec(str(ROOT / "jobs" / f"{preset}.yaml"),
                         [f"decode.resolution={mode}", "clip.weights=null", "allow_random_weights=true",
                          "clip.precision=fp32", "resources.clip_score.num_gpus=0", *sets])
        batch = DecodeStage.from_spec(spec, None)({"uri": np.array(uris, dtype=object)})
        batch["category"] = np.array(["part"] * n, dtype=object)
        batch["image_id"] = np.array([f"i{i}" for i in range(n)], dtype=object)
        import torch

        torch.manual_seed(0)
        scored = ClipScoreStage.from_spec(spec)(batch)
        assert list(scored["status"]) == ["ok"] * n, scored["error_message"]
        out[mode] = (np.asarray(scored["score"], dtype=float), [np.asarray(m) for m in scored["anomaly_map"]])
    (se, me), (sw, mw) = out["exact"], out["working"]
    assert all(a.shape == b.shape for a, b in zip(me, mw))
    return {"preset": preset, "images": n, "score_max": float(np.abs(se - sw).max()),
            "map_max": max(float(np.abs(a - b).max()) for a, b in zip(me, mw)),
            "map_mean": float(np.mean([np.abs(a - b).mean() for a, b in zip(me, mw)])),
            "map_range": [float(min(m.min() for m in me)), float(max(m.max() for m in me))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["default", "musc_fast", "musc", "winclip", "aprilgan"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[2, 5, 12], choices=sorted(SIZES))
    ap.add_argument("--formats", nargs="+", default=["jpeg", "png"], choices=["jpeg", "png"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--deviation", type=int, default=0, metavar="N",
                    help="also score N generated 12-MP JPEGs with each preset's real model (random weights) in both "
                         "modes and report the score and map deviation (slow on a CPU: seconds per image)")
    ap.add_argument("--deviation-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for the deviation runs (e.g. pixel.vision_multiplier=1: FADE's vision map x 80 "
                         "saturates the fused map with random weights)")
    ap.add_argument("--device-decode", default=None, metavar="DEVICE",
                    help="also measure decode.device: model against cpu on the JPEGs (cpu, or cuda on a GPU machine)")
    ap.add_argument("--device-batch", type=int, default=8, help="images per device decode call")
    args = ap.parse_args()

    import torch
    from PIL import Image

    torch.set_num_threads(1)
    results, on_device = [], []
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as scratch:
        for mp in args.sizes:
            h, w = SIZES[mp]
            pixels = camera_like(h, w, seed=mp)
            for fmt in args.formats:
                path = os.path.join(scratch, f"{mp}mp.{fmt}")
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "JPEG" if fmt == "jpeg" else "PNG",
                                             **({"quality": 90} if fmt == "jpeg" else {}))
                Path(path).write_bytes(buf.getvalue())
                for preset in args.presets:
                    r = measure(preset, path, args.repeats)
                    r.update(preset=preset, megapixels=mp, format=fmt, file_bytes=len(buf.getvalue()))
                    results.append(r)
                    print(json.dumps(r), flush=True)
                    if args.device_decode and fmt == "jpeg":
                        d = device_decode_cost(preset, path, args.device_decode, args.repeats, args.device_batch)
                        d.update(megapixels=mp)
                        on_device.append(d)
                        print(json.dumps(d), flush=True)
        from pipeline.config import load_spec

        alone = [p for p in args.presets  # mutual scoring and few-shot need their category pass first: left out
                 if not (lambda s: s.mutual or s.few_shot)(load_spec(str(ROOT / "jobs" / f"{p}.yaml")))]
        deviations = [score_deviation(p, args.deviation, scratch, args.deviation_set) for p in alone] \
            if args.deviation else []
        for d in deviations:
            print(json.dumps(d), flush=True)
    print()
    print(f"CPU ms per image (one thread, median of {args.repeats}); bytes from decode to the model stage; "
          f"cores to feed one GPU at {GPU_RATE:.0f} images/s")
    print("| preset | image | mode | decoded | read | decode | resize | encode | total ms | cores @200/s | "
          "MB to model | decode x | total x | bytes x | input dev max / mean |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for mode in ("exact", "working"):
            m = r[mode]
            gains = (f"{r['decode_gain']} | {r['cpu_gain']} | {r['bytes_gain']} | {r['input_deviation']:.3f} / "
                     f"{r['input_deviation_mean']:.4f}"
                     if mode == "working" else " | | | ")
            print(f"| {r['preset']} | {r['megapixels']} MP {r['format']} | {mode} | {m['decoded'][1]} x "
                  f"{m['decoded'][0]} | {m['read_ms']} | {m['decode_ms']} | {m['resize_ms']} | {m['encode_ms']} | "
                  f"{m['total_ms']} | {m['cores_for_200_per_s']} | {m['bytes_to_model'] / 1e6:.1f} | {gains} |")
    if on_device:
        print("\ndecode.device: model against cpu (working size): the decode task's CPU ms per image and the bytes "
              "it ships; the model actor's decode per image (wall, and its CPU)")
        print("| preset | image | device | batch | decoded | task ms, cpu decode | task ms, model decode | "
              "MB shipped, cpu / model | actor wall ms | actor CPU ms | pixels vs cpu decode, mean / max |")
        print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for d in on_device:
            print(f"| {d['preset']} | {d['megapixels']} MP jpeg | {d['device']} | {d['batch']} | {d['decoded'][1]} x "
                  f"{d['decoded'][0]} | {d['task_ms_cpu_decode']} | {d['task_ms_model_decode']} | "
                  f"{d['bytes_cpu_decode'] / 1e6:.2f} / {d['bytes_model_decode'] / 1e6:.2f} | {d['actor_wall_ms']} | "
                  f"{d['actor_cpu_ms']} | {d['pixel_dev_mean']} / {d['pixel_dev_max']} |")
    if deviations:
        print("\nworking against exact, the preset's real model with random weights, generated 12-MP JPEGs")
        print("| preset | images | max score diff | max map diff | mean map diff | map range |")
        print("|---|---:|---:|---:|---:|---|")
        for d in deviations:
            print(f"| {d['preset']} | {d['images']} | {d['score_max']:.2e} | {d['map_max']:.2e} | "
                  f"{d['map_mean']:.2e} | [{d['map_range'][0]:.3f}, {d['map_range'][1]:.3f}] |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": os.uname().nodename, "results": results, "deviations": deviations,
                       "device_decode": on_device}, fh, indent=1)


if __name__ == "__main__":
    main()
