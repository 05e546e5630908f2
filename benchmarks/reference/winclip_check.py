"""zsad's WinCLIP (jobs/winclip_fewshot.yaml, and its zero-shot part) against anomalib's OWN
``WinClipModel``, zero- and few-shot, on the same random weights and generated images (issue 29;
`make reference-check`).

The reference side is anomalib 2.7 (``--anomalib PATH``: its wheel, or a checkout of
github.com/open-edge-platform/anomalib) with the sequence-first open_clip it needs (``--open-clip
PATH``: the open_clip_torch 2.24.0 wheel or a checkout at that tag; current open_clip collapses
WinCLIP's window embeddings, benchmarks/anomalib_winclip/README.md). Neither is copied into this
project: a scratch folder receives anomalib's ``models/image/winclip/{torch_model,utils,prompting}.py``
and ``models/components/base/{buffer_list,dynamic_buffer}.py`` as they are, open_clip 2.24 whole, and
three shims for what the WinCLIP model imports but does not compute with: ``anomalib.data.InferenceBatch``
(a named tuple of ``pred_score`` and ``anomaly_map``), the two mixins' package, and
``lightning_utilities.core.imports.module_available``. A child process runs there, with
``create_model_and_transforms`` asked for ``pretrained=None`` (no hub here; seeded random weights,
saved to ``clip.pt`` for zsad), and computes what ``WinClipModel.forward`` computes with its own
pre-processing (``Resize((240, 240), antialias=True, bicubic)`` and CLIP's ``Normalize`` on float
pixels): the zero-shot output, then ``setup(reference_images=...)`` and the few-shot output.

zsad's side runs its own stages on the same decoded images with ``clip.weights`` = that file:
ClipScoreStage with jobs/winclip_fewshot.yaml's text settings and no few-shot section (zero-shot), then
with the bank the bank stage writes (few-shot). Printed: max |zsad - anomalib| per quantity; exit 1
above ``--tol`` (default 1e-4).

THE WEIGHTS ARE RANDOM: the numbers show that the two implementations agree, nothing about accuracy.

Usage:
  .venv/bin/python benchmarks/reference/winclip_check.py --anomalib anomalib-2.7.0-py3-none-any.whl
      --open-clip open_clip_torch-2.24.0-py3-none-any.whl [--images 4] [--k 2] [--tol 1e-4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    generated_images,
    image_batch,
    report,
    stored_bank,
    unpacked,
)  # noqa: E402 - benchmarks/reference/ beside this script

CATEGORY = "bottle"
WINCLIP = [
    "models/image/winclip/torch_model.py",
    "models/image/winclip/utils.py",
    "models/image/winclip/prompting.py",
    "models/components/base/buffer_list.py",
    "models/components/base/dynamic_buffer.py",
]


def prepare(scratch: str, anomalib: str, open_clip_src: str) -> str:
    lib = os.path.join(scratch, "lib")
    root = unpacked(anomalib, "anomalib", scratch)
    for rel in WINCLIP:
        dst = os.path.join(lib, "anomalib", rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(os.path.join(root, "anomalib", rel), dst)
    shutil.copytree(
        os.path.join(unpacked(open_clip_src, "open_clip", scratch), "open_clip"), os.path.join(lib, "open_clip")
    )
    shims = {
        "anomalib/__init__.py": "",
        "anomalib/data/__init__.py": "from typing import NamedTuple\n\nimport torch\n\n\n"
        "class InferenceBatch(NamedTuple):\n    pred_score: torch.Tensor\n    anomaly_map: torch.Tensor\n",
        "anomalib/models/__init__.py": "",
        "anomalib/models/components/__init__.py": "from .base.buffer_list import BufferListMixin  # noqa: F401\n"
        "from .base.dynamic_buffer import DynamicBufferMixin  # noqa: F401\n",
        "anomalib/models/components/base/__init__.py": "",
        "anomalib/models/image/__init__.py": "",
        "anomalib/models/image/winclip/__init__.py": "",
        "lightning_utilities/__init__.py": "",
        "lightning_utilities/core/__init__.py": "",
        "lightning_utilities/core/imports.py": "import importlib.util\n\n\ndef module_available(name):\n"
        "    return importlib.util.find_spec(name) is not None\n",
    }
    for rel, text in shims.items():
        path = os.path.join(lib, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
    return lib


def reference_side(scratch: str, lib: str, tests: list[str], refs: list[str]) -> None:
    import open_clip  # 2.24, from the scratch folder
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

    assert open_clip.__file__.startswith(lib), open_clip.__file__
    create = open_clip.create_model_and_transforms
    open_clip.create_model_and_transforms = lambda name, pretrained=None, **kw: create(name, pretrained=None, **kw)
    from anomalib.models.image.winclip.torch_model import WinClipModel

    torch.manual_seed(0)
    model = WinClipModel(class_name=CATEGORY).eval()
    torch.save(model.clip.state_dict(), os.path.join(scratch, "clip.pt"))
    pre = Compose(
        [
            Resize((240, 240), antialias=True, interpolation=InterpolationMode.BICUBIC),
            Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
        ]
    )

    def load(paths):
        return torch.stack(
            [
                pre(torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1).float() / 255)
                for p in paths
            ]
        )

    with torch.no_grad():
        zero = model(load(tests))
        model.setup(reference_images=load(refs))
        few = model(load(tests))
    np.savez(
        os.path.join(scratch, "reference.npz"),
        zero_score=zero.pred_score.numpy(),
        zero_map=zero.anomaly_map.numpy(),
        few_score=few.pred_score.numpy(),
        few_map=few.anomaly_map.numpy(),
    )


def zsad_side(scratch: str, tests: list[str], refs: list[str]) -> dict:
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_spec
    from pipeline.stages.clip_score import ClipScoreStage

    spec = load_spec(
        str(ROOT / "jobs" / "winclip_fewshot.yaml"),
        [
            f"clip.weights={os.path.join(scratch, 'clip.pt')}",
            "clip.precision=fp32",
            "maps.map_size=240",
            "resources.clip_score.num_gpus=0",
            f"few_shot.k={len(refs)}",
        ],
    )
    tids = [f"t{i}" for i in range(len(tests))]
    zero = ClipScoreStage.from_spec(spec.model_copy(update={"few_shot": None}))(image_batch(tests, tids, CATEGORY))
    bank = stored_bank(
        spec, os.path.join(scratch, "run"), "banks", CATEGORY, refs, [f"r{i}" for i in range(len(refs))], k=len(refs)
    )
    scorer = ClipScoreStage.from_spec(spec)
    scorer.banks = {CATEGORY: {**bank, "k": len(refs), "reference_digest": "reference-check"}}
    few = scorer(image_batch(tests, tids, CATEGORY))
    check_ok(zero, few)
    return {
        "zero_score": np.asarray(zero["score"]),
        "zero_map": np.stack(list(zero["anomaly_map"])),
        "few_score": np.asarray(few["score"]),
        "few_map": np.stack(list(few["anomaly_map"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--anomalib", required=True, help="anomalib 2.7's wheel or a checkout of open-edge-platform/anomalib"
    )
    ap.add_argument("--open-clip", required=True, help="open_clip_torch 2.24.0's wheel or a checkout at that tag")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.side == "reference":
        spec = child_inputs(args)
        reference_side(args.scratch, spec["lib"], spec["tests"], spec["refs"])
        return
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="winclip-check-") as scratch:
        lib = prepare(scratch, args.anomalib, args.open_clip)
        tests, refs = generated_images(scratch, CATEGORY, args.images, args.k)
        json.dump({"lib": lib, "tests": tests, "refs": refs}, open(os.path.join(scratch, "inputs.json"), "w"))
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--side",
                "reference",
                "--scratch",
                scratch,
                "--anomalib",
                args.anomalib,
                "--open-clip",
                args.open_clip,
            ],
            cwd=scratch,
            env={**os.environ, "PYTHONPATH": lib},
            check=True,
        )
        ref = dict(np.load(os.path.join(scratch, "reference.npz")))
        got = zsad_side(scratch, tests, refs)
    rows = {
        name: float(np.max(np.abs(got[key] - ref[key])))
        for name, key in (
            ("zero-shot image score", "zero_score"),
            ("zero-shot map (240 x 240)", "zero_map"),
            ("few-shot image score ((zero-shot + max few-shot map) / 2)", "few_score"),
            ("few-shot map ((zero-shot + few-shot) / 2)", "few_map"),
        )
    }
    report(
        f"WinCLIP reference check: anomalib's WinClipModel (ViT-B-16-plus-240 at 240 px), {args.images} images, "
        f"k {args.k}; random weights; {time.monotonic() - t0:.0f} s",
        rows,
        args.tol,
        args.json,
    )


if __name__ == "__main__":
    main()
