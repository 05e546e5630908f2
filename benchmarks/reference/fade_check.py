"""zsad's FADE few-shot (jobs/fade_fewshot.yaml) against FADE's OWN code, on the same random weights and
generated images (issue 29; `make reference-check`).

The reference side is the public repository github.com/BMVC-FADE/BMVC-FADE (``--fade PATH``: a
checkout, or a git directory such as a mirror) with the GEM package it imports (``--gem``: the
gem_torch 1.0.1 wheel or a checkout of WalBouss/GEM), the sequence-first open_clip of its time
(``--open-clip``: the open_clip_torch 2.24.0 wheel; GEM's blocks expect sequence-first tokens),
OpenCV (``--opencv``: an opencv-python-headless 4.x wheel; FADE resizes its maps with ``cv2.resize``)
and einops (``--einops``: its wheel; GEM imports it). None is copied into this project. A scratch
folder receives FADE's ``utils/`` and ``datasets/`` modules and ``prompts/`` as they are, the
unpacked packages, and one shim: ``xgboost`` (``utils/text_model.py`` imports ``XGBClassifier`` for a
text model FADE's published runs do not use).

A child process runs there and computes what ``scripts/run_fade.py`` computes for its few-shot
recipe (``--shots K --seed S --vision-feature clip``, every other option at its default: language
and vision classification and segmentation, the 240 px class token against winclip_prompt.json with
the category's name, the GEM language maps at 240/448/896 px against winclip_prompt.json plus the five
chatgpt3.5 lists with "object", the ``average`` text model, vision multiplier 3.5, weight 0.85,
square inputs), by calling FADE's own functions in run_fade.py's order: ``gem.create_gem_model``
(random open_clip weights instead of the laion400m checkpoint, seeded, saved to ``clip.pt`` for
zsad), ``build_text_model``, ``extract_ref_patch_embeddings`` on FADE's ``MVTecDataset`` train split
(its shuffling DataLoader chooses the references), ``build_image_models``, then per test image of its
``MVTecDataset`` test split ``extract_image_embeddings``, ``predict_classification`` and
``predict_segmentation`` (language and vision). Kept: the image score (clipped mean of the language
score and the vision map's maximum), the vision map's maximum, and the fused map at 56 x 56 before
FADE turns it into 8-bit PNGs. The reference side also names the train images FADE chose (by
matching their patch embeddings).

zsad's side lists the same train split with its own reference code, chooses with
``few_shot.sampler: torch_shuffle`` (the preset's), builds the bank with the bank stage and scores the
test images with ClipScoreStage (``pixel.prompt_sets: [winclip]`` plus FADE's five files as
``pixel.prompt_files``, as README "Presets" tells FADE users; ``maps.map_size`` 56). The zero-shot
preset (jobs/fade.yaml) is compared on the same run against the README's zero-shot command
(``--shots 0 --vision-feature gem --use-query-img-in-vision-memory-bank --vision-segmentation-multiplier 80
--vision-segmentation-weight 0.5``: the query image is its own bank, 2nd neighbour). Printed: the
chosen references on both sides, and max |zsad - FADE| per quantity; exit 1 above ``--tol`` (default
1e-4) or when the references differ.

THE WEIGHTS ARE RANDOM: the numbers show that the two implementations agree, nothing about accuracy.

Usage:
  .venv/bin/python benchmarks/reference/fade_check.py --fade /path/to/BMVC-FADE
      --gem gem_torch-1.0.1-py3-none-any.whl --open-clip open_clip_torch-2.24.0-py3-none-any.whl
      --opencv opencv_python_headless-4.*.whl --einops einops-*.whl [--images 4] [--train 5] [--k 2]
      [--seed 0] [--tol 1e-4] [--json PATH]
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
    extract_files,
    image_batch,
    report,
    stored_bank,
    unpacked,
)  # noqa: E402 - benchmarks/reference/ beside this script

CATEGORY = "metal_nut"  # a name with "_": FADE writes it as "metal nut" in the classification prompts
SIZES = [240, 448, 896]
LLM_PROMPTS = [f"prompts/chatgpt3.5_prompt{i}.json" for i in range(1, 6)]
FADE_FILES = ["utils", "datasets", "prompts"]


def prepare(scratch: str, args) -> tuple[str, str]:
    """The scratch folder's lib (FADE's modules, the packages, the shim); returns (lib, FADE's commit)."""
    lib = os.path.join(scratch, "lib")
    os.makedirs(lib)
    commit = extract_files(args.fade, lib, FADE_FILES)
    for path, package in (
        (args.gem, "gem"),
        (args.open_clip, "open_clip"),
        (args.opencv, "cv2"),
        (args.einops, "einops"),
    ):
        root = unpacked(path, package, scratch)
        for entry in os.listdir(root):  # the package and what it loads beside it (opencv's .libs)
            if entry == package or entry.endswith(".libs"):
                shutil.copytree(os.path.join(root, entry), os.path.join(lib, entry))
    os.makedirs(os.path.join(lib, "xgboost"))
    with open(os.path.join(lib, "xgboost", "__init__.py"), "w") as fh:
        fh.write(
            "class XGBClassifier:  # shim: imported by FADE's text_model.py, not used by its published runs\n"
            "    def __init__(self, *a, **kw):\n        raise RuntimeError('xgboost is a shim in this check')\n"
        )
    return lib, commit


def reference_side(scratch: str, lib: str, data: str, k: int, seed: int) -> None:
    import gem
    import open_clip  # 2.24, from the scratch folder
    import torch

    assert open_clip.__file__.startswith(lib) and gem.__file__.startswith(lib), (open_clip.__file__, gem.__file__)
    from datasets.base import DatasetSplit
    from datasets.mvtec import MVTecDataset
    from utils.anomaly_detection import predict_classification, predict_segmentation
    from utils.embeddings import extract_image_embeddings
    from utils.image_model import build_image_models, extract_query_patch_embeddings, extract_ref_patch_embeddings
    from utils.text_model import build_text_model

    torch.manual_seed(0)
    clip_model = open_clip.create_model("ViT-B-16-plus-240", pretrained=None)
    torch.save(clip_model.state_dict(), os.path.join(scratch, "clip.pt"))
    gem.gem.open_clip.create_model = lambda *a, **kw: clip_model  # no hub here: the seeded weights above
    gem_model = gem.create_gem_model(model_name="ViT-B/16-plus-240", pretrained="laion400m_e31", device="cpu")
    patch = gem_model.model.visual.patch_size
    source = Path(data)

    cls_text = build_text_model(gem_model, ["prompts/winclip_prompt.json"], CATEGORY.replace("_", " "), "average")
    seg_text = build_text_model(gem_model, ["prompts/winclip_prompt.json", *LLM_PROMPTS], "object", "average")
    train = MVTecDataset(source=source, classname=CATEGORY, resize=SIZES, square=True, split=DatasetSplit.TRAIN)
    ref = extract_ref_patch_embeddings(train, gem_model, "clip", k, seed, "cpu")
    image_models = build_image_models(ref, False)

    # which train images FADE chose: each one's 240 px patch embeddings against the bank's
    chosen = []
    for shot in range(k):
        bank = ref[240][shot]
        dists = [
            float(
                np.abs(
                    extract_image_embeddings({240: train[i]["image"][240][None]}, gem_model, "cpu")[240]["clip"][
                        "patch"
                    ][0]
                    - bank
                ).max()
            )
            for i in range(len(train))
        ]
        chosen.append(str(train.data_to_iterate[int(np.argmin(dists))][2]))

    test = MVTecDataset(
        source=source, classname=CATEGORY, resize=sorted(set(SIZES) | {448}), square=True, split=DatasetSplit.TEST
    )
    paths, scores, vision_max, maps, zero_scores, zero_maps = [], [], [], [], [], []
    for i in range(len(test)):
        item = test[i]
        emb = extract_image_embeddings({s: item["image"][s][None] for s in SIZES}, gem_model, "cpu")
        language_score = predict_classification(cls_text, emb, 240, "clip")
        language_map = predict_segmentation(seg_text, emb, SIZES, "gem", patch, "language")
        vision_map = predict_segmentation(image_models, emb, SIZES, "clip", patch, "vision") * 3.5
        vision_score = np.max(vision_map, axis=(1, 2))
        paths.append(item["image_path"])
        scores.append(np.clip((language_score + vision_score) / 2, 0, 1)[0])
        vision_max.append(vision_score[0])
        maps.append(np.clip(0.15 * language_map + 0.85 * vision_map, 0, 1)[0])
        # zero-shot (README's "both" command: --shots 0 --vision-feature gem --use-query-img-in-vision-memory-bank
        # --vision-segmentation-multiplier 80 --vision-segmentation-weight 0.5): the image is its own bank
        own = build_image_models(extract_query_patch_embeddings(emb, SIZES, "gem"), True)
        own_map = predict_segmentation(own, emb, SIZES, "gem", patch, "vision") * 80.0
        zero_scores.append(np.clip(language_score, 0, 1)[0])
        zero_maps.append(np.clip(0.5 * language_map + 0.5 * own_map, 0, 1)[0])
    np.savez(
        os.path.join(scratch, "reference.npz"),
        score=np.array(scores),
        vision_max=np.array(vision_max),
        map=np.stack(maps),
        zero_score=np.array(zero_scores),
        zero_map=np.stack(zero_maps),
    )
    with open(os.path.join(scratch, "reference.json"), "w") as fh:
        json.dump({"tests": paths, "chosen": chosen}, fh)


def zsad_side(scratch: str, data: str, tests: list[str], k: int, seed: int) -> tuple[dict, list[str]]:
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_spec
    from pipeline.io.references import choose_references, list_references
    from pipeline.stages.clip_score import ClipScoreStage

    files = [os.path.join(scratch, "lib", p) for p in LLM_PROMPTS]
    common = [
        f"clip.weights={os.path.join(scratch, 'clip.pt')}",
        "clip.precision=fp32",
        "maps.map_size=56",
        "resources.clip_score.num_gpus=0",
        "pixel.prompt_sets=[winclip]",
        f"pixel.prompt_files=[{','.join(files)}]",
    ]
    ids = [f"t{i}" for i in range(len(tests))]
    zero = ClipScoreStage.from_spec(load_spec(str(ROOT / "jobs" / "fade.yaml"), common))(
        image_batch(tests, ids, CATEGORY)
    )
    spec = load_spec(str(ROOT / "jobs" / "fade_fewshot.yaml"), [*common, f"few_shot.k={k}", f"few_shot.seed={seed}"])
    _, candidates = list_references(data, "mvtec")
    chosen, _ = choose_references(
        candidates, [CATEGORY], k, seed, spec.few_shot.with_replacement, spec.few_shot.sampler
    )
    refs = chosen.sort_values("shot")["uri"].tolist()
    bank = stored_bank(spec, os.path.join(scratch, "run"), "banks", CATEGORY, refs, [f"r{i}" for i in range(k)], k=k)
    scorer = ClipScoreStage.from_spec(spec)
    scorer.banks = {CATEGORY: {**bank, "k": k, "reference_digest": "reference-check"}}
    out = scorer(image_batch(tests, ids, CATEGORY))
    check_ok(zero, out)
    return (
        {
            "score": np.asarray(out["score"]),
            "vision_max": np.asarray(out["score_vision"]),
            "map": np.stack(list(out["anomaly_map"])),
            "zero_score": np.asarray(zero["score"]),
            "zero_map": np.stack(list(zero["anomaly_map"])),
        },
        refs,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fade", required=True, help="a checkout (or git directory) of BMVC-FADE/BMVC-FADE")
    ap.add_argument("--gem", required=True, help="gem_torch 1.0.1's wheel or a checkout of WalBouss/GEM")
    ap.add_argument("--open-clip", required=True, help="open_clip_torch 2.24.0's wheel or a checkout at that tag")
    ap.add_argument("--opencv", required=True, help="an opencv-python-headless 4.x wheel")
    ap.add_argument("--einops", required=True, help="an einops wheel")
    ap.add_argument("--images", type=int, default=4, help="test images (half with drawn defects)")
    ap.add_argument("--train", type=int, default=5, help="train images to draw the references from")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    add_common_arguments(ap)
    args = ap.parse_args()
    if args.side == "reference":
        inputs = child_inputs(args)
        reference_side(args.scratch, inputs["lib"], inputs["data"], args.k, args.seed)
        return
    if args.k > args.train:
        raise SystemExit(f"--k {args.k} is more than --train {args.train}")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fade-check-") as scratch:
        lib, commit = prepare(scratch, args)
        sys.path.insert(0, str(ROOT))
        from pipeline.synthetic import make_dataset

        data = os.path.join(scratch, "data")
        make_dataset(
            data,
            categories=(CATEGORY,),
            n_good=args.images - args.images // 2,
            n_bad=args.images // 2,
            n_train=args.train,
            size=200,
        )
        json.dump({"lib": lib, "data": data}, open(os.path.join(scratch, "inputs.json"), "w"))
        # FADE's modules import "utils", "datasets" and "prompts/..." relative to its root: run from lib
        subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--side",
                "reference",
                "--scratch",
                scratch,
                "--k",
                str(args.k),
                "--seed",
                str(args.seed),
                *sum(
                    (
                        [f"--{n}", getattr(args, n.replace("-", "_"))]
                        for n in ("fade", "gem", "open-clip", "opencv", "einops")
                    ),
                    [],
                ),
            ],
            cwd=lib,
            env={**os.environ, "PYTHONPATH": lib},
            check=True,
        )
        ref = dict(np.load(os.path.join(scratch, "reference.npz")))
        named = json.load(open(os.path.join(scratch, "reference.json")))
        got, refs = zsad_side(scratch, data, named["tests"], args.k, args.seed)
        rel = [[os.path.relpath(p, data) for p in side] for side in (named["chosen"], refs)]
    print(f"references chosen by FADE's DataLoader (seed {args.seed}): {rel[0]}")
    print(f"references chosen by zsad (few_shot.sampler torch_shuffle):  {rel[1]}")
    rows = {
        name: float(np.max(np.abs(got[key] - ref[key])))
        for name, key in (
            ("image score (clip((language + max vision map) / 2))", "score"),
            ("vision score (max of the few-shot vision map x 3.5)", "vision_max"),
            ("fused map (0.15 language + 0.85 vision, 56 x 56)", "map"),
            ("zero-shot (fade.yaml) image score (240 px language score)", "zero_score"),
            ("zero-shot (fade.yaml) fused map (0.5 language + 0.5 own-image GEM vision x 80)", "zero_map"),
        )
    }
    for key in ("map", "zero_map"):  # a map clipped everywhere would agree trivially
        inside = float(np.mean((ref[key] > 0) & (ref[key] < 1)))
        print(
            f"FADE's {key.replace('_', '-')}: range [{ref[key].min():.3f}, {ref[key].max():.3f}], "
            f"{100 * inside:.0f} % of its values inside (0, 1)"
        )
    if rel[0] != rel[1]:
        print("FAIL: zsad chose other references than FADE")
        raise SystemExit(1)
    report(
        f"FADE few-shot reference check: FADE {commit[:7]} with GEM and open_clip 2.24 (ViT-B-16-plus-240 at "
        f"240/448/896 px), {args.images} images, k {args.k} of {args.train}; random weights; "
        f"{time.monotonic() - t0:.0f} s",
        rows,
        args.tol,
        args.json,
        commit=commit,
        references=rel[0],
    )


if __name__ == "__main__":
    main()
