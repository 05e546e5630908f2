"""open_clip's registry known without importing open_clip: the cache file equals open_clip's own
answer, is named by the installed version and zsad's configs, and a damaged file is rebuilt."""

import json

import pytest

from pipeline.models import registry


def test_the_cached_registry_equals_open_clips_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSAD_CACHE_DIR", str(tmp_path))
    from pipeline.models.registry import register_configs

    open_clip = register_configs()
    expected = {m: list(open_clip.list_pretrained_tags_by_model(m)) for m in open_clip.list_models()}
    assert registry.models() == expected  # cold: read from open_clip, then written
    files = list(tmp_path.glob("open_clip-*.json"))
    assert len(files) == 1 and open_clip.__version__ in files[0].name
    assert json.loads(files[0].read_text())["models"] == expected
    assert "zsad-tiny" in expected and "openai" in expected["ViT-L-14-336"]

    files[0].write_text(
        json.dumps({"models": {"only-this": []}, "vision": {}})
    )  # the warm path reads the file, not open_clip
    assert registry.models() == {"only-this": []}
    files[0].write_text("{broken")  # a damaged file is rebuilt
    assert registry.models() == expected


def test_check_model_names_the_unknown_model_or_tag(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSAD_CACHE_DIR", str(tmp_path))
    registry.check_model("ViT-B-16-plus-240", "laion400m_e31")
    with pytest.raises(registry.ModelLoadError, match=r"unknown open_clip model 'ViT-B-16-plsu' \(similar: .*ViT-B-16"):
        registry.check_model("ViT-B-16-plsu")
    with pytest.raises(registry.ModelLoadError, match="no pretrained tag 'laion' for zsad-tiny"):
        registry.check_model("zsad-tiny", "laion")


def test_an_unwritable_cache_folder_still_answers(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ZSAD_CACHE_DIR", str(blocker))
    assert "zsad-tiny" in registry.models()


def test_the_vision_geometry_is_the_model_configs_and_matches_the_built_tower(tmp_path, monkeypatch):
    """Depth, width, patch and input size come from open_clip's config (no model built); the tiny
    model's numbers are checked against the tower open_clip builds, the rest against known values."""
    monkeypatch.setenv("ZSAD_CACHE_DIR", str(tmp_path))
    big = registry.vision("ViT-L-14-336")
    assert (big.walkable, big.layers, big.width, big.patch_size, big.image_size, big.grid, big.embed_dim) == (
        True,
        24,
        1024,
        14,
        336,
        24,
        768,
    )
    assert registry.vision("ViT-B-16-plus-240").grid == 15
    assert not registry.vision("RN50").walkable and "ResNet" in registry.vision("RN50").why
    assert not registry.vision("EVA02-L-14").walkable and "timm" in registry.vision("EVA02-L-14").why
    assert registry.vision("no-such-model") is None
    from pipeline.models import clip as clip_models
    from pipeline.models import vit

    visual = clip_models.build_clip("zsad-tiny", device="cpu")[0].visual
    tiny = registry.vision("zsad-tiny")
    assert (tiny.layers, tiny.width, tiny.patch_size, tiny.grid, tiny.embed_dim) == (
        len(visual.transformer.resblocks),
        visual.transformer.width,
        vit.patch_size(visual),
        visual.grid_size[0],
        int(visual.output_dim),
    )
