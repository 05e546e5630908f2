"""zsad's APRIL-GAN (jobs/aprilgan.yaml, jobs/aprilgan_fewshot.yaml) against APRIL-GAN's OWN code, zero-
and few-shot, on the same random weights and generated images (issue 29; `make reference-check`).

The reference side is the public repository github.com/ByChelsea/VAND-APRIL-GAN, given on the command
line (``--aprilgan PATH``: a checkout, or a git directory such as a mirror); it is never copied into
this project. Its vendored, modified open_clip (``open_clip/``), ``model.py`` (the adapters) and
``prompt_ensemble.py`` are extracted into a scratch folder, with one shim beside them:
``pkg_resources.py`` re-exporting ``packaging`` (the only thing prompt_ensemble.py takes from
setuptools, which this Python does not ship); on a machine without CUDA, the one ``.to('cuda')`` its
vision forward makes (an attention sum it never uses) stays on the CPU. A child process runs there
with that folder first on ``sys.path`` (so ``import open_clip`` is APRIL-GAN's), and computes what
its test.py computes per test image, in fp32 on the CPU:

- the model as its ``create_model(..., img_size=518, pretrained='openai')`` builds it: the config's
  CLIP (exact GELU) at 518 px with the 336-px weights loaded through its ``resize_pos_embed``; the
  weights are random (seeded) instead of OpenAI's, saved to ``clip.pt`` for zsad;
- its ``LinearLayer`` adapters, random (seeded), saved as ``{"trainable_linearlayer": ...}`` (the
  authors' file format) for zsad;
- its preprocessing (``Resize((518, 518))`` bicubic, a no-op ``CenterCrop``), its
  ``encode_text_with_prompt_ensemble`` for the category, ``encode_image(image, features_list)``,
  the image score ``softmax(100 x cos)[1]`` and the zero-shot map (per block: adapter, unit
  tokens, ``100 x`` tokens @ text, bilinear align_corners to 518, softmax, summed);
- few-shot: the memory of the references' block tokens (class token dropped), scikit-learn's
  ``cosine_similarity``, ``min(1 - cos)`` per query patch, bilinear align_corners, summed, added.

zsad's side runs its own stages (ClipScoreStage; BankStage for the few-shot bank, with the manifest
the driver writes) on the same decoded images with ``clip.weights`` = that ``clip.pt`` and
``pixel.weights`` = that adapters file. Printed: max |zsad - reference| per quantity; exit 1 when one
exceeds ``--tol`` (default 1e-4).

THE WEIGHTS ARE RANDOM: the numbers show that the two implementations agree, nothing about accuracy.

Usage:
  .venv/bin/python benchmarks/reference/aprilgan_check.py --aprilgan /path/to/VAND-APRIL-GAN
      [--model ViT-L-14-336] [--size 518] [--layers 6 12 18 24] [--images 4] [--k 2] [--tol 1e-4] [--json PATH]
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
    add_common_arguments,
    check_ok,
    child_inputs,
    extract_files,
    generated_images,
    image_batch,
    report,
    stored_bank,
)  # noqa: E402 - benchmarks/reference/ beside this script

ROOT = Path(__file__).resolve().parents[2]
CATEGORY = "bottle"


# --------------------------------------------------------------------------------------------
# the scratch folder: the reference's files + the shim
# --------------------------------------------------------------------------------------------


def extract(source: str, scratch: str) -> str:
    """The reference's open_clip/, model.py and prompt_ensemble.py into ``scratch``, with the shim;
    returns its commit."""
    commit = extract_files(source, scratch, ["open_clip", "model.py", "prompt_ensemble.py"])
    with open(os.path.join(scratch, "pkg_resources.py"), "w") as fh:
        fh.write(
            "import packaging  # noqa: F401 - shim: prompt_ensemble.py takes `packaging` "
            "from setuptools' pkg_resources\n"
            "import packaging.version  # noqa: F401\n"
        )
    return commit


def images(scratch: str, n: int, k: int) -> tuple[list[str], list[str]]:
    return generated_images(scratch, CATEGORY, n, k)


# --------------------------------------------------------------------------------------------
# the reference side (a child process, APRIL-GAN's open_clip first on sys.path)
# --------------------------------------------------------------------------------------------


def reference_side(
    scratch: str, model_name: str, size: int, layers: list[int], tests: list[str], refs: list[str]
) -> None:
    import open_clip  # APRIL-GAN's vendored copy (the scratch folder is first on sys.path)
    import torch
    import torch.nn.functional as F
    from model import LinearLayer
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import resize_pos_embed
    from open_clip.transform import image_transform
    from PIL import Image
    from prompt_ensemble import encode_text_with_prompt_ensemble
    from sklearn.metrics import pairwise

    assert open_clip.__file__.startswith(scratch), open_clip.__file__
    if not torch.cuda.is_available():
        # its VisionTransformer.forward sums the attention maps into a tensor it moves to 'cuda' and never
        # uses (out_attn); on a machine without CUDA that one move stays on the CPU
        to = torch.Tensor.to
        torch.Tensor.to = lambda self, *a, **kw: self if a[:1] == ("cuda",) else to(self, *a, **kw)
    torch.manual_seed(0)
    cfg = open_clip.get_model_config(model_name)
    native = open_clip.create_model(model_name, cfg["vision_cfg"]["image_size"], pretrained=None)
    state = native.state_dict()
    torch.save(state, os.path.join(scratch, "clip.pt"))
    model = open_clip.create_model(model_name, size, pretrained=None)  # the config's CLIP at `size`, as for 'openai'
    state = dict(state)
    resize_pos_embed(state, model)  # what its pretrained path does with the 336-px weights
    model.load_state_dict(state, strict=True)
    model.eval()
    torch.manual_seed(1)
    linear = LinearLayer(cfg["vision_cfg"]["width"], cfg["embed_dim"], len(layers), model_name)
    torch.save({"trainable_linearlayer": linear.state_dict()}, os.path.join(scratch, "adapters.pth"))
    preprocess = image_transform(size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer(model_name)
    out: dict[str, list] = {"score": [], "zero_map": [], "few_map": []}
    with torch.no_grad():
        text = encode_text_with_prompt_ensemble(model, [CATEGORY], tokenizer, "cpu")[CATEGORY]
        memory = None
        for path in refs:
            _, tokens = model.encode_image(preprocess(Image.open(path))[None], layers)
            tokens = [p[0, 1:, :] for p in tokens]
            memory = tokens if memory is None else [torch.cat([m, t]) for m, t in zip(memory, tokens)]
        for path in tests:
            image = preprocess(Image.open(path))[None]
            feats, tokens = model.encode_image(image, layers)
            feats = feats / feats.norm(dim=-1, keepdim=True)
            out["score"].append(float((100.0 * feats @ text).softmax(dim=-1)[0, 1]))
            tokens = linear([t.clone() for t in tokens])
            maps = []
            for t in tokens:
                t = t / t.norm(dim=-1, keepdim=True)
                m = 100.0 * t @ text
                b, length, _ = m.shape
                h = int(np.sqrt(length))
                m = F.interpolate(m.permute(0, 2, 1).view(b, 2, h, h), size=size, mode="bilinear", align_corners=True)
                maps.append(torch.softmax(m, dim=1)[:, 1].numpy())
            zero = np.sum(maps, axis=0)[0]
            _, tokens = model.encode_image(image, layers)
            few = []
            for idx, p in enumerate(tokens):
                cos = pairwise.cosine_similarity(memory[idx].numpy(), p[0, 1:, :].numpy())
                h = int(np.sqrt(cos.shape[1]))
                m = np.min(1 - cos, 0).reshape(1, 1, h, h)
                few.append(F.interpolate(torch.tensor(m), size=size, mode="bilinear", align_corners=True)[0].numpy())
            out["zero_map"].append(zero)
            out["few_map"].append(zero + np.sum(few, axis=0)[0])
    np.savez(os.path.join(scratch, "reference.npz"), **{k: np.asarray(v) for k, v in out.items()})


# --------------------------------------------------------------------------------------------
# zsad's side
# --------------------------------------------------------------------------------------------


def zsad_side(scratch: str, model_name: str, size: int, layers: list[int], tests: list[str], refs: list[str]) -> dict:
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_spec
    from pipeline.stages.clip_score import ClipScoreStage

    sets = [
        f"clip.model={model_name}",
        f"clip.weights={os.path.join(scratch, 'clip.pt')}",
        "clip.precision=fp32",
        f"pixel.weights={os.path.join(scratch, 'adapters.pth')}",
        f"pixel.layers=[{','.join(map(str, layers))}]",
        f"pixel.image_size={size}",
        f"maps.map_size={size}",
        "resources.clip_score.num_gpus=0",
    ]
    tids = [f"t{i}" for i in range(len(tests))]
    zero = ClipScoreStage.from_spec(load_spec(str(ROOT / "jobs" / "aprilgan.yaml"), sets))(
        image_batch(tests, tids, CATEGORY)
    )
    few_spec = load_spec(str(ROOT / "jobs" / "aprilgan_fewshot.yaml"), [*sets, f"few_shot.k={len(refs)}"])
    bank = stored_bank(
        few_spec,
        os.path.join(scratch, "run"),
        "banks",
        CATEGORY,
        refs,
        [f"r{i}" for i in range(len(refs))],
        k=len(refs),
    )
    scorer = ClipScoreStage.from_spec(few_spec)
    scorer.banks = {CATEGORY: {**bank, "k": len(refs), "reference_digest": "reference-check"}}
    few = scorer(image_batch(tests, tids, CATEGORY))
    check_ok(zero, few)
    return {
        "score": np.asarray(zero["score"]),
        "zero_map": np.stack(list(zero["anomaly_map"])),
        "few_score": np.asarray(few["score"]),
        "few_map": np.stack(list(few["anomaly_map"])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--aprilgan", required=True, help="a checkout (or git directory) of github.com/ByChelsea/VAND-APRIL-GAN"
    )
    ap.add_argument("--model", default="ViT-L-14-336")
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.side == "reference":
        spec = child_inputs(args)
        reference_side(args.scratch, args.model, args.size, args.layers, spec["tests"], spec["refs"])
        return
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aprilgan-check-") as scratch:
        commit = extract(args.aprilgan, scratch)
        tests, refs = images(scratch, args.images, args.k)
        json.dump({"tests": tests, "refs": refs}, open(os.path.join(scratch, "inputs.json"), "w"))
        env = {**os.environ, "PYTHONPATH": scratch}
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--side",
                "reference",
                "--scratch",
                scratch,
                "--aprilgan",
                args.aprilgan,
                "--model",
                args.model,
                "--size",
                str(args.size),
                "--layers",
                *map(str, args.layers),
            ],
            cwd=scratch,
            env=env,
            check=True,
        )
        ref = dict(np.load(os.path.join(scratch, "reference.npz")))
        got = zsad_side(scratch, args.model, args.size, args.layers, tests, refs)
    rows = {
        "image score (text probability)": float(np.max(np.abs(got["score"] - ref["score"]))),
        f"zero-shot map (sum of the blocks, {args.size} x {args.size})": float(
            np.max(np.abs(got["zero_map"] - ref["zero_map"]))
        ),
        "few-shot map (zero-shot + memory)": float(np.max(np.abs(got["few_map"] - ref["few_map"]))),
        "few-shot map maximum (the transductive score's input)": float(
            np.max(np.abs(got["few_map"].max(axis=(1, 2)) - ref["few_map"].max(axis=(1, 2))))
        ),
        "few-shot run's streaming score (text probability)": float(np.max(np.abs(got["few_score"] - ref["score"]))),
    }
    report(
        f"APRIL-GAN reference check: {args.model} at {args.size} px, blocks {args.layers}, {args.images} images, "
        f"k {args.k}; APRIL-GAN commit {commit}; random weights; {time.monotonic() - t0:.0f} s",
        rows,
        args.tol,
        args.json,
        commit=commit,
        model=args.model,
        size=args.size,
    )


if __name__ == "__main__":
    main()
