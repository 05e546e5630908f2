"""zsad's MuSc (jobs/musc.yaml's mutual scoring stage, pools built and read as a run does them) against
MuSc's OWN code end to end: its vendored open_clip's forward at 518 px (the positional embedding
resized by its own ``resize_pos_embed``), its preprocessing, its LNAMD and MSM modules and its
interpolation, on the same random weights and generated images (issue 29; `make reference-check`).

The reference side is github.com/xrli-U/MuSc, given on the command line (``--musc PATH``: a
checkout or a git directory); ``models/backbone/open_clip`` and ``models/modules`` are extracted
into a scratch folder (never copied into this project), beside a ``cv2`` shim (its transformer.py
imports OpenCV for a debug helper the forward never calls; any use of the shim raises), and a child
process imports them from there,
computing what ``models/musc.py`` computes for one category with ``divide_num`` 1 (every image
against every other one), in fp32 on the CPU: ``create_model_and_transforms(model, 518)``'s
preprocessing (``Resize((518, 518))`` bicubic, a no-op crop), ``encode_image(image, layers)``, per r
``LNAMD._embed`` + L2-normalisation, ``MSM`` per block with ``topmin_max`` 0.3, the mean over the
blocks then over r, bilinear align_corners to 518, the image score as the map's maximum. The model is
the config's CLIP at 518 with 336-px random (seeded) weights loaded through its ``resize_pos_embed``,
as its pretrained path does; the weights are saved to ``clip.pt`` for zsad.

zsad's side: the bank stage writes the category's pool (every image: the whole category, MuSc
exactly) as part files, the driver's manifest, and the mutual scoring stage scores every image with
``mutual.max_pool_bytes`` below the pool's size, so the pool is streamed in several chunks.

THE WEIGHTS ARE RANDOM: the numbers show agreement, nothing about accuracy.

Usage:
  .venv/bin/python benchmarks/reference/musc_forward_check.py --musc /path/to/MuSc
      [--model ViT-L-14-336] [--size 518] [--layers 6 12 18 24] [--images 6] [--tol 1e-4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    ROOT,
    add_common_arguments,
    check_ok,
    child_inputs,
    extract_files,
    generated_images,
    image_batch,
    report,
    stored_bank,
)  # noqa: E402 - benchmarks/reference/ beside this script

CATEGORY = "bottle"
os.environ.setdefault("TQDM_DISABLE", "1")  # MSM wraps its loop in tqdm


def reference_side(scratch: str, model_name: str, size: int, layers: list[int], tests: list[str]) -> None:
    import models.backbone.open_clip as open_clip  # MuSc's vendored copy, from the scratch folder
    import torch
    import torch.nn.functional as F
    from models.backbone.open_clip.model import resize_pos_embed
    from models.modules._LNAMD import LNAMD
    from models.modules._MSM import MSM
    from PIL import Image

    assert open_clip.__file__.startswith(scratch), open_clip.__file__
    if not torch.cuda.is_available():  # its vision forward moves an unused attention sum to 'cuda'
        to = torch.Tensor.to
        torch.Tensor.to = lambda self, *a, **kw: self if a[:1] == ("cuda",) else to(self, *a, **kw)
    torch.manual_seed(0)
    cfg = open_clip.get_model_config(model_name)
    native = open_clip.create_model(model_name, cfg["vision_cfg"]["image_size"], pretrained=None)
    state = dict(native.state_dict())
    torch.save(state, os.path.join(scratch, "clip.pt"))
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, size, pretrained=None)
    resize_pos_embed(state, model)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in tests])
        _, tokens = model.encode_image(batch, layers)
        tokens = [t.cpu() for t in tokens]
        maps_r = []
        for r in (1, 3, 5):
            lnamd = LNAMD(device="cpu", r=r, feature_dim=tokens[0].shape[-1], feature_layer=layers)
            feats = lnamd._embed(tokens)
            feats /= feats.norm(dim=-1, keepdim=True)
            per_layer = [
                MSM(Z=feats[:, :, l, :], device="cpu", topmin_min=0, topmin_max=0.3) for l in range(len(layers))
            ]
            maps_r.append(torch.stack(per_layer).mean(0))
        grid = torch.stack(maps_r).mean(0)
        b, length = grid.shape
        h = int(np.sqrt(length))
        maps = F.interpolate(grid.view(b, 1, h, h), size=size, mode="bilinear", align_corners=True)[:, 0]
    np.savez(
        os.path.join(scratch, "reference.npz"), maps=maps.numpy(), scores=maps.reshape(b, -1).max(-1).values.numpy()
    )


def zsad_side(scratch: str, model_name: str, size: int, layers: list[int], tests: list[str]) -> dict:
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_spec
    from pipeline.io.banks import StoredBank
    from pipeline.stages.clip_score import ClipScoreStage

    ids = [f"t{i}" for i in range(len(tests))]
    sets = [
        f"clip.model={model_name}",
        f"clip.weights={os.path.join(scratch, 'clip.pt')}",
        "clip.precision=fp32",
        f"pixel.layers=[{','.join(map(str, layers))}]",
        f"pixel.image_size={size}",
        f"maps.map_size={size}",
        "resources.clip_score.num_gpus=0",
        f"mutual.pool_size={len(tests)}",
    ]
    spec = load_spec(str(ROOT / "jobs" / "musc.yaml"), sets)
    pool = stored_bank(spec, os.path.join(scratch, "run"), "pools", CATEGORY, tests, ids)
    per_image = StoredBank(pool["uri"], pool["digest"]).image_bytes([f"layer{l}" for l in layers])
    stage = ClipScoreStage.from_spec(
        load_spec(str(ROOT / "jobs" / "musc.yaml"), [*sets, f"mutual.max_pool_bytes={2 * per_image}"])
    )
    stage.pools = {CATEGORY: {**pool, "images": len(ids), "image_ids": ids}}
    out = stage(image_batch(tests, ids, CATEGORY))
    check_ok(out)
    return {
        "maps": np.stack(list(out["anomaly_map"])),
        "scores": np.asarray(out["score_mutual"]),
        "chunk": stage.pool(CATEGORY).get("chunk"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--musc", required=True, help="a checkout (or git directory) of github.com/xrli-U/MuSc")
    ap.add_argument("--model", default="ViT-L-14-336")
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24])
    ap.add_argument("--images", type=int, default=6)
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.side == "reference":
        tests = child_inputs(args)["tests"]
        reference_side(args.scratch, args.model, args.size, args.layers, tests)
        return
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="musc-check-") as scratch:
        commit = extract_files(args.musc, scratch, ["models/backbone/open_clip", "models/modules"])
        with open(os.path.join(scratch, "cv2.py"), "w") as fh:  # its transformer.py imports cv2 for a debug helper only
            fh.write(
                "def __getattr__(name):\n"
                "    raise ImportError(f'cv2.{name}: OpenCV is not installed for the reference check')\n"
            )
        tests, _ = generated_images(scratch, CATEGORY, args.images)
        json.dump({"tests": tests}, open(os.path.join(scratch, "inputs.json"), "w"))
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--side",
                "reference",
                "--scratch",
                scratch,
                "--musc",
                args.musc,
                "--model",
                args.model,
                "--size",
                str(args.size),
                "--layers",
                *map(str, args.layers),
            ],
            cwd=scratch,
            env={**os.environ, "PYTHONPATH": scratch},
            check=True,
        )
        ref = dict(np.load(os.path.join(scratch, "reference.npz")))
        got = zsad_side(scratch, args.model, args.size, args.layers, tests)
    rows = {
        f"map ({args.size} x {args.size}, clipped to [0, 2] as stored)": float(
            np.max(np.abs(got["maps"] - np.clip(ref["maps"], 0, 2)))
        ),
        "image score (the map's maximum)": float(np.max(np.abs(got["scores"] - ref["scores"]))),
    }
    report(
        f"MuSc end-to-end reference check: {args.model} at {args.size} px, blocks {args.layers}, {args.images} images "
        f"(the whole category as pool, streamed {got['chunk']} images at a time); MuSc commit {commit}; "
        f"random weights; {time.monotonic() - t0:.0f} s",
        rows,
        args.tol,
        args.json,
        commit=commit,
        model=args.model,
        size=args.size,
        chunk=got["chunk"],
    )


if __name__ == "__main__":
    main()
