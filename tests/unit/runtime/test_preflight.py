"""The driver's check of the settings against the model's shape (pipeline/runtime/preflight.py): each
problem names the key, the value and what the model allows; the presets as shipped (and --tiny) fit."""

from pathlib import Path

import pytest

from pipeline.config import TrainSpec, load_spec
from pipeline.runtime.preflight import model_problems

JOBS = sorted(p for p in Path("jobs").glob("*.yaml"))
TINY_CLIP = ["clip.model=zsad-tiny", "clip.weights=null", "allow_random_weights=true"]


def _spec(job: str, *sets: str, model=None):
    return load_spec(f"jobs/{job}.yaml", [*TINY_CLIP, *sets], model=model)


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_every_preset_fits_its_own_model_and_the_tiny_one(path):
    model = TrainSpec if "train" in path.stem else None
    assert model_problems(load_spec(path, model=model)) == []
    assert model_problems(load_spec(path, model=model, tiny=True)) == []


def test_vit_l_layers_and_sizes_on_the_tiny_model_are_named_with_what_it_allows():
    problems = model_problems(_spec("musc"))
    assert problems == [
        "pixel.layers [6, 12, 18, 24] exceed the 8 blocks of zsad-tiny (block numbers 1..8; e.g. [2, 4, 6, 8])",
        "pixel.image_size 518 is not a multiple of zsad-tiny's patch size 16 (its patch embedding would drop the last "
        "6 pixels): use 512 or 528",
    ]
    train = model_problems(_spec("train_aprilgan", model=TrainSpec))
    assert [p.split(" ")[0] for p in train] == ["adapters.layers", "adapters.image_size"]
    assert model_problems(_spec("aprilgan", "pixel.weights=null"))[0].startswith("pixel.layers [6, 12, 18, 24] exceed")


def test_fade_winclip_and_clip_sizes():
    fade = model_problems(_spec("fade", "pixel.gem_depth=9", "pixel.scales=[128,150]"))
    assert fade == ["pixel.gem_depth 9 exceeds the 8 blocks of zsad-tiny (1..8)",
                    "pixel.scales [128, 150]: scale 150 is not a multiple of zsad-tiny's patch size 16 (its patch "
                    "embedding "
                    "would drop the last 6 pixels): use 144 or 160"]
    win = model_problems(_spec("winclip", "pixel.window_sizes=[2,9]"))
    assert win == ["pixel.window_sizes [2, 9]: windows of [9] patches do not fit the 8 x 8 patch grid of zsad-tiny at "
                   "128 px (at most 8)"]
    assert model_problems(_spec("winclip", "pixel.window_sizes=[2,9]", "clip.image_size=160")) == []  # a 10 x 10 grid
    assert model_problems(_spec("smoke", "clip.image_size=100")) == [
        "clip.image_size 100 is not a multiple of zsad-tiny's patch size 16 (its patch embedding would drop the last 4 "
        "pixels): use 96 or 112"]


def test_a_model_without_a_walkable_vit_is_refused_for_pixel_maps_only():
    rn50 = ["clip.model=RN50", "clip.weights=null", "allow_random_weights=true"]
    problems = model_problems(load_spec("jobs/winclip.yaml", rn50))
    assert len(problems) == 1 and problems[0].startswith("clip.model RN50: pixel.kind winclip_windows needs a CLIP ViT")
    assert "ResNet" in problems[0]
    image_only = load_spec("jobs/winclip.yaml", ["clip.model=RN50", "clip.weights=null", "allow_random_weights=true",
                                                 "pixel.kind=none"])
    assert model_problems(image_only) == []


def test_an_adapters_file_for_other_layers_or_another_backbone(tmp_path):
    from pipeline.models.adapters import Adapters, save_adapters

    four = tmp_path / "four.safetensors"
    save_adapters(Adapters(64, 32, 4), str(four), {"layers": [1, 3, 5, 7], "backbone": "zsad-tiny"})
    at_128 = ["pixel.image_size=128", f"pixel.weights={four}"]
    assert model_problems(_spec("aprilgan", "pixel.layers=[2,4,6,8]", *at_128)) == [
        f"pixel.layers [2, 4, 6, 8]: the adapters in {four} were trained on layers [1, 3, 5, 7] (of zsad-tiny); "
        "use those"]
    assert model_problems(_spec("aprilgan", "pixel.layers=[1,3,5,7]", *at_128)) == []
    three = model_problems(_spec("aprilgan", "pixel.layers=[2,4,8]", "pixel.image_size=128", f"pixel.weights={four}"))
    assert three == [f"pixel.layers [2, 4, 8]: the adapters in {four} are for 4 layers, not 3"]
    wide = tmp_path / "wide.safetensors"
    save_adapters(Adapters(1024, 768, 4), str(wide), {})
    other = model_problems(_spec("train_aprilgan", "adapters.layers=[2,4,6,8]", "adapters.image_size=128",
                                 f"adapters.weights={wide}", model=TrainSpec))
    assert other == [f"adapters.weights: the adapters in {wide} map width 1024 to 768, but zsad-tiny has width 64 and "
                     "embedding 32: they were trained for another backbone"]


def test_a_sam_checkpoint_of_another_size_than_sam_model(tmp_path):
    import torch

    from pipeline.models.sam import build_sam

    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(build_sam("tiny").state_dict(), ckpt)
    sets = ["sam.model=vit_b", f"sam.weights={ckpt}", "pixel.layers=[2,4,6,8]", "pixel.image_size=128",
            "pixel.weights=null"]
    assert model_problems(_spec("clip_sam", *sets)) == [
        f"sam.model vit_b: {ckpt} is a tiny checkpoint (image-encoder width 64; vit_b has 768): set sam.model: tiny or "
        "give a vit_b checkpoint"]
    assert model_problems(_spec("clip_sam", *sets, "sam.model=tiny")) == []
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    junk = model_problems(_spec("clip_sam", *sets[:1], f"sam.weights={tmp_path / 'junk.pth'}", *sets[2:]))
    assert len(junk) == 1 and junk[0].startswith("sam.weights: SAM checkpoint")
    assert "could not be loaded safely" in junk[0]


def test_spec_problem_is_the_one_check_before_anything_starts(tmp_path):
    """Issue 30: zsad validate, zsad submit (and a run's driver, objects=True) share spec_problem:
    model and tag, the settings against the model's shape (before any file is looked up), then the
    weight and prompt files."""
    from pipeline.runtime.preflight import layout_problem, spec_problem

    assert layout_problem("auto") is None and layout_problem("mvtec") is None
    assert layout_problem("zip").startswith("--layout 'zip' is not one of auto, ")
    assert spec_problem(_spec("smoke")) is None
    unknown = spec_problem(_spec("smoke", "clip.model=ViT-Q-99"))
    assert unknown.startswith("clip.model: unknown open_clip model 'ViT-Q-99'")
    assert spec_problem(_spec("smoke", f"clip.weights={tmp_path}/none.pt")).startswith("clip.weights: ")
    assert spec_problem(_spec("smoke", "clip.image_size=100")) == (
        "the spec does not fit its models (clip.model zsad-tiny); nothing was started:\n"
        "  clip.image_size 100 is not a multiple of zsad-tiny's patch size 16 (its patch embedding would drop the "
        "last 4 pixels): use 96 or 112")
    assert spec_problem(_spec("winclip", "pixel.window_sizes=[2,9]", "clip.image_size=100")).count("\n  ") == 2
    # the shape first: a missing weights file is not looked up while the settings do not fit the model
    both = spec_problem(_spec("smoke", "clip.image_size=100", f"clip.weights={tmp_path}/none.pt"))
    assert both.startswith("the spec does not fit its models")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = _spec("smoke", f"clip.weights={tmp_path / 'junk.pt'}")
    assert spec_problem(junk) is None  # validate leaves the file's contents to the run
    assert spec_problem(junk, objects=True).startswith("clip.weights: ")
