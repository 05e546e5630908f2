"""Zero-shot pixel maps: WinCLIP fusion, the vision map's geometry, FADE shapes and ranges."""

import numpy as np
import pytest
import torch

from pipeline.models import clip as clip_models
from pipeline.models import pixel, vit
from pipeline.models.scoring import anomaly_probability, build_classifier


@pytest.fixture(scope="module")
def tiny():
    model, pre = clip_models.build_clip("zsad-tiny")
    g = torch.Generator().manual_seed(11)
    text = build_classifier(torch.randn(5, 32, generator=g), torch.randn(3, 32, generator=g), "mean_norm_renorm")
    return model, pre, text


def test_second_neighbour_distance_brute_force():
    patches = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(0))
    got = pixel.second_neighbour_distance(patches, chunk=7)
    pn = torch.nn.functional.normalize(patches, dim=-1)
    for b in range(2):
        for i in range(30):
            sims = sorted((float(pn[b, i] @ pn[b, j]) for j in range(30)), reverse=True)
            assert got[b, i].item() == pytest.approx(0.5 * (1 - sims[1]), abs=1e-6)


def test_winclip_map_is_the_harmonic_fusion(tiny):
    model, _, text = tiny
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    s_img = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        fused = pixel.winclip_map(model.visual, x, text, 0.07, s_img, (2, 3))
        tokens, grid = vit.embed(model.visual, x)
        per_scale = []
        for k in (2, 3):
            emb = vit.window_embeddings(model.visual, tokens, grid, k)
            s = anomaly_probability(emb.reshape(-1, 32), text, 0.07).reshape(2, -1)
            per_scale.append(vit.harmonic_patch_scores(s, grid, k))
    expected = 3 / (1 / s_img.view(2, 1, 1) + 1 / per_scale[0] + 1 / per_scale[1])
    assert fused.shape == (2, 8, 8) and torch.allclose(fused, expected, atol=1e-6)
    assert fused.min() > 0 and fused.max() < 1


def _pre(img, size, pre):
    return clip_models.preprocess_images([torch.from_numpy(img)], clip_models.Preprocess(size, pre.mean, pre.std))


def test_vision_map_finds_the_odd_square(tiny):
    model, pre, text = tiny
    rng = np.random.default_rng(0)
    img = np.full((128, 128, 3), 128, np.uint8) + rng.integers(0, 3, (128, 128, 3), dtype=np.uint8)  # uniform texture
    img[48:64, 80:96] = (250, 20, 20)  # one patch (16 px at patch size 16), aligned to the grid: row 3, col 5
    with torch.no_grad():
        _, vision, _ = pixel.fade_maps(model.visual, {128: _pre(img, 128, pre)}, text, grid=8, depth=2)
    row, col = divmod(int(vision[0].argmax()), 8)
    assert (row, col) == (3, 5)


def test_fade_maps_shapes_and_range(tiny):
    model, pre, text = tiny
    img = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    with torch.no_grad():
        lang, vis, fused = pixel.fade_maps(
            model.visual, {128: _pre(img, 128, pre), 192: _pre(img, 192, pre)}, text, grid=12, depth=2
        )
    assert lang.shape == vis.shape == fused.shape == (1, 12, 12)
    assert 0 <= float(lang.min()) and float(lang.max()) <= 1
    assert 0 <= float(fused.min()) and float(fused.max()) <= 1
    assert torch.allclose(fused, (0.5 * lang + 0.5 * vis).clamp(0, 1))
    up = pixel.upsample(fused, (50, 70))
    assert up.shape == (1, 50, 70)
