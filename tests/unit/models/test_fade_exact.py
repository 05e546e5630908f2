"""FADE as its reference code computes it (issue 12): PIL resize, the sentence wrapper and prompt
files, the GEM / CLIP features of the vision map, and the maps against a reference written here from
FADE's algorithm (BMVC-FADE/BMVC-FADE: utils/text_model.AverageTextModel, utils/image_model.ImageModel
with the query image as its own memory bank, utils/anomaly_detection.predict_segmentation), with
explicit loops where FADE uses library calls. GEM itself is checked against the official algorithm
in test_vit.py."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import FadeZeroShot, PromptFileSpec, ZeroShotImageScore, load_spec
from pipeline.models import clip as clip_models
from pipeline.models import pixel, vit
from pipeline.models.prompts import PromptFileError, ensemble, prompt_set, read_prompt_file
from pipeline.models.scoring import build_classifier

FADE_WRAPPER = "a photo of a {}."
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny():
    model, pre = clip_models.build_clip("zsad-tiny")
    with torch.no_grad():  # less symmetric than the initialisation, so the checks have teeth
        g = torch.Generator().manual_seed(3)
        for p in model.visual.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model, pre


# ---------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("shape,size", [((50, 70), 240), ((300, 200), 128), ((128, 128), 128)])
def test_pil_resize_equals_torchvision_resize_of_a_pil_image(shape, size):
    """FADE's loader: transforms.Resize((S, S), BICUBIC) on the PIL image, ToTensor, Normalize."""
    from torchvision import transforms

    img = np.random.default_rng(size).integers(0, 256, (*shape, 3), dtype=np.uint8)
    mean, std = clip_models.OPENAI_MEAN, clip_models.OPENAI_STD
    reference = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(mean=mean, std=std),
    ])(Image.fromarray(img))
    pre = clip_models.Preprocess(size, mean, std, resize="pil")
    got = clip_models.preprocess_images([torch.from_numpy(img)], pre)[0]
    assert got.shape == reference.shape and float((got - reference).abs().max()) < 1e-5
    if shape != (size, size):  # the torch resize is not FADE's: the option matters
        torch_way = clip_models.preprocess_images([torch.from_numpy(img)], clip_models.Preprocess(size, mean, std))[0]
        assert float((torch_way - reference).abs().max()) > 1e-3


def test_an_unknown_resize_is_refused():
    with pytest.raises(ValueError, match="unknown resize"):
        clip_models.preprocess_images(
            [torch.zeros(4, 4, 3, dtype=torch.uint8)], clip_models.Preprocess(8, (0, 0, 0), (1, 1, 1), "box")
        )


# ------------------------------------------------------------------------------ wrapper, prompt files

#: FADE's six segmentation files: WinCLIP's list and five LLM-written ones (normal, abnormal counts)
LLM_COUNTS = [(94, 99), (90, 110), (83, 100), (73, 84), (83, 93)]


def _fade_files(tmp_path):
    """Six files in FADE's layout, built here: WinCLIP's sentences with {classname}, then five lists
    of made-up sentences with duplicates (FADE keeps them): 577 normal / 574 abnormal in all."""
    normal, abnormal = prompt_set("winclip").sentences("{classname}")
    files = [{"normal": {"instruction": "", "prompts": normal}, "abnormal": {"instruction": "", "prompts": abnormal}}]
    for k, (n, a) in enumerate(LLM_COUNTS):
        files.append(
            {
                "normal": {"prompts": [f"A flawless surface, view {i % (n - 2)} of list {k}." for i in range(n)]},
                "abnormal": [
                    f"A scratched part number {i % (a - 3)} in list {k}." for i in range(a)
                ],  # the plain layout
            }
        )
    paths = []
    for k, data in enumerate(files):
        path = tmp_path / f"prompt{k}.json"
        path.write_text(json.dumps(data))
        paths.append(str(path))
    return paths


def _fade_sentences(paths, classname):
    """FADE: utils.embeddings.extract_text_embeddings per file, then GEM's encode_text wrapper."""
    normal, abnormal = [], []
    for path in paths:
        with open(path) as fh:
            prompts = json.load(fh)
        for key, out in (("normal", normal), ("abnormal", abnormal)):
            items = prompts[key]["prompts"] if isinstance(prompts[key], dict) else prompts[key]
            out += [t.format(classname=classname) for t in items]
    return [f"a photo of a {t}." for t in normal], [f"a photo of a {t}." for t in abnormal]


def test_prompt_files_and_the_wrapper_give_fades_sentence_list(tmp_path):
    paths = _fade_files(tmp_path)
    want_n, want_a = _fade_sentences(paths, "object")
    assert (len(want_n), len(want_a)) == (577, 574) and len(set(want_n)) < 577  # duplicates kept
    lists = [read_prompt_file(p) for p in paths]
    assert ensemble((), lists, "object", FADE_WRAPPER) == (want_n, want_a)
    # zsad's winclip set is FADE's winclip_prompt.json: the set plus the five files is the same list
    assert ensemble(("winclip",), lists[1:], "object", FADE_WRAPPER) == (want_n, want_a)
    assert want_n[0] == "a photo of a a cropped photo of the object."
    # the classification side: the object's name, and no wrapper when none is set
    n, _ = ensemble(("winclip",), [], "metal nut")
    assert n[0] == "a cropped photo of the metal nut"


def test_the_stage_encodes_the_wrapped_file_sentences(tmp_path, tiny):

    from pipeline.config import ClipSpec
    from pipeline.stages.clip_score import ClipScoreStage

    model, pre = tiny
    paths = _fade_files(tmp_path)
    fade = FadeZeroShot(
        scales=(128,), grid=8, gem_depth=2, prompt_sets=(), prompt_files=tuple(paths), wrapper=FADE_WRAPPER
    )
    stage = ClipScoreStage(
        ClipSpec(model="zsad-tiny", weights=None), ZeroShotImageScore(), pixel=fade, model_factory=lambda: (model, pre)
    )
    stage.setup()
    got = stage.pixel_text_classifier()
    want_n, want_a = _fade_sentences(paths, "object")
    tokenizer = clip_models.tokenizer("zsad-tiny")
    with torch.no_grad():
        raw = [torch.nn.functional.normalize(model.encode_text(tokenizer([t])), dim=-1)[0] for t in want_n + want_a]
    mean_n = torch.stack(raw[:577]).mean(0)  # FADE's AverageTextModel: mean of normalised embeddings
    mean_a = torch.stack(raw[577:]).mean(0)
    assert torch.allclose(got.normal, mean_n, atol=1e-6) and torch.allclose(got.anomalous, mean_a, atol=1e-6)


@pytest.mark.parametrize(
    "content,problem",
    [
        ("not json", "not JSON"),
        (json.dumps({"normal": ["a"]}), "no 'abnormal' list"),
        (json.dumps({"normal": {"instruction": ""}, "abnormal": ["b"]}), "'normal' has no 'prompts' list"),
        (json.dumps({"normal": [], "abnormal": ["b"]}), "non-empty list"),
        (json.dumps({"normal": ["a {object}"], "abnormal": ["b"]}), "braces other than the {classname}"),
        (json.dumps({"normal": ["a", 3], "abnormal": ["b"]}), "non-string or empty entry"),
    ],
)
def test_an_unusable_prompt_file_is_named_with_its_problem(tmp_path, content, problem):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(PromptFileError, match="prompt file .*p.json") as err:
        read_prompt_file(str(path))
    assert problem in str(err.value)


def test_the_driver_checks_prompt_files_before_a_run(tmp_path):
    from pipeline.stages.clip_score import prompt_file_problem

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"normal": ["fine {classname}"], "abnormal": ["broken {classname}"]}))
    digest = hashlib.sha256(good.read_bytes()).hexdigest()

    def spec(files, where="pixel"):
        base = {
            "clip": {"model": "zsad-tiny", "weights": None},
            "allow_random_weights": True,
            "pixel": {"kind": "fade_zero_shot"},
        }
        base[where] = {**base.get(where, {}), "prompt_files": files}
        return base

    from pipeline.config import spec_from_dict

    assert prompt_file_problem(spec_from_dict(spec([{"path": str(good), "sha256": digest}]), "t")) is None
    missing = prompt_file_problem(spec_from_dict(spec([str(tmp_path / "none.json")], "score"), "t"))
    assert missing == f"score.prompt_files: prompt file {tmp_path / 'none.json'} does not exist"
    wrong = prompt_file_problem(spec_from_dict(spec([{"path": str(good), "sha256": "0" * 64}]), "t"))
    assert wrong.startswith("pixel.prompt_files: prompt file") and "sha256 mismatch" in wrong
    assert PromptFileSpec.model_validate("s3://bucket/p.json").uri == "s3://bucket/p.json"


def test_the_fade_based_presets_compute_what_fade_computes():
    for preset in ("fade", "default", "vvv"):
        spec = load_spec(REPO / "jobs" / f"{preset}.yaml")
        assert spec.clip.resize == "pil", preset
        assert spec.pixel.kind == "fade_zero_shot" and spec.pixel.wrapper == FADE_WRAPPER, preset
        assert spec.pixel.vision_features == "gem" and spec.pixel.object_name == "object", preset
    fade = load_spec(REPO / "jobs" / "fade.yaml")
    assert fade.score.wrapper == FADE_WRAPPER and fade.score.object_names.policy == "underscore"
    assert fade.score.aggregation == fade.pixel.aggregation == "mean_norm"


# -------------------------------------------------------------------------------------------- maps


def _bilinear(grid_map: np.ndarray, out: int) -> np.ndarray:
    """cv2.resize(..., INTER_LINEAR) as FADE calls it, by loops: half-pixel centres, edges clamped."""
    g = grid_map.shape[0]
    if g == out:
        return grid_map.copy()
    scale = g / out
    result = np.zeros((out, out))
    for y in range(out):
        sy = max((y + 0.5) * scale - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), g - 1)
        y1, fy = min(y0 + 1, g - 1), sy - y0
        for x in range(out):
            sx = max((x + 0.5) * scale - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), g - 1)
            x1, fx = min(x0 + 1, g - 1), sx - x0
            top = (1 - fx) * grid_map[y0, x0] + fx * grid_map[y0, x1]
            bottom = (1 - fx) * grid_map[y1, x0] + fx * grid_map[y1, x1]
            result[y, x] = (1 - fy) * top + fy * bottom
    return result


def _fade_reference(
    visual, images_by_size, normal_raw, abnormal_raw, out, depth, features, multiplier=80.0, weight=0.5
):
    """FADE's zero-shot maps for one image: language (AverageTextModel on GEM patches) and vision
    (ImageModel(kth=2) on the image's own patches) per size, resized to ``out`` and averaged."""
    t_n = (normal_raw / np.linalg.norm(normal_raw, axis=1, keepdims=True)).mean(0)
    t_a = (abnormal_raw / np.linalg.norm(abnormal_raw, axis=1, keepdims=True)).mean(0)
    lang, vis = [], []
    for size in sorted(images_by_size):
        with torch.no_grad():
            _, gem_p, clip_p, g = vit.gem_forward(visual, images_by_size[size], depth)
        gem_p = gem_p[0].double().numpy()
        feats = gem_p if features == "gem" else clip_p[0].double().numpy()
        gem_p = gem_p / np.linalg.norm(gem_p, axis=1, keepdims=True)
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        l_map = np.zeros(g * g)
        v_map = np.zeros(g * g)
        for i in range(g * g):
            logits = 100.0 * np.array([gem_p[i] @ t_n, gem_p[i] @ t_a])
            e = np.exp(logits - logits.max())
            l_map[i] = e[1] / e.sum()
            distances = sorted(0.5 * (1.0 - feats[i] @ feats[j]) for j in range(g * g))
            v_map[i] = distances[1]  # the 1st is the patch itself
        lang.append(_bilinear(l_map.reshape(g, g), out))
        vis.append(_bilinear(v_map.reshape(g, g), out))
    language = np.mean(lang, axis=0)
    vision = np.mean(vis, axis=0) * multiplier
    return language, vision, np.clip((1 - weight) * language + weight * vision, 0, 1)


@pytest.mark.parametrize("features", ["gem", "clip"])
def test_fade_maps_equal_the_reference_with_gem_and_with_clip_vision_features(tiny, features):
    model, pre = tiny
    img = np.random.default_rng(5).integers(0, 256, (90, 110, 3), dtype=np.uint8)
    images = {
        s: clip_models.preprocess_images([torch.from_numpy(img)], clip_models.Preprocess(s, pre.mean, pre.std, "pil"))
        for s in (128, 192)
    }
    g = torch.Generator().manual_seed(9)
    normal_raw, abnormal_raw = torch.randn(6, 32, generator=g), torch.randn(4, 32, generator=g)
    text = build_classifier(normal_raw, abnormal_raw, "mean_norm")
    with torch.no_grad():
        lang, vis, fused = pixel.fade_maps(model.visual, images, text, 0.01, 12, 3, 80.0, 0.5, features)
    ref_l, ref_v, ref_f = _fade_reference(
        model.visual, images, normal_raw.double().numpy(), abnormal_raw.double().numpy(), 12, 3, features
    )
    assert np.abs(lang[0].double().numpy() - ref_l).max() < 1e-5
    assert np.abs(vis[0].double().numpy() - ref_v).max() < 1e-4  # x 80: 1.25e-6 before the multiplier
    assert np.abs(fused[0].double().numpy() - ref_f).max() < 1e-4
    other = "clip" if features == "gem" else "gem"
    with torch.no_grad():
        _, vis_other, _ = pixel.fade_maps(model.visual, images, text, 0.01, 12, 3, 80.0, 0.5, other)
    assert float((vis - vis_other).abs().max()) > 1e-2  # the features really differ


def test_unknown_vision_features_are_refused(tiny):
    model, pre = tiny
    x = torch.zeros(1, 3, 128, 128)
    text = build_classifier(torch.ones(1, 32), -torch.ones(1, 32), "mean_norm")
    with pytest.raises(ValueError, match="vision_features"):
        pixel.fade_maps(model.visual, {128: x}, text, vision_features="dino")
