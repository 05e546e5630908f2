"""open_clip loading: the tiny registered config, seeded random init, strict checkpoint loading."""

import pickle

import pytest
import torch

from pipeline.models import clip as clip_models


def test_tiny_config_registered_and_builds():
    model, pre = clip_models.build_clip("zsad-tiny")
    assert pre.size == 128
    assert pre.mean == clip_models.OPENAI_MEAN
    x = torch.zeros(2, 3, 128, 128)
    assert clip_models.encode_image(model, x).shape == (2, 32)
    assert not model.training


def test_random_init_is_seeded_so_every_actor_agrees():
    a, _ = clip_models.build_clip("zsad-tiny")
    b, _ = clip_models.build_clip("zsad-tiny")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    torch.manual_seed(123)
    x = torch.rand(1)
    torch.manual_seed(123)
    clip_models.build_clip("zsad-tiny")
    assert torch.equal(torch.rand(1), x)  # building a model leaves the global RNG alone


def test_checkpoint_roundtrip_and_strictness(tmp_path):
    src, _ = clip_models.build_clip("zsad-tiny")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    loaded, _ = clip_models.build_clip("zsad-tiny", checkpoint=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("visual.transformer.resblocks.3")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(clip_models.ModelLoadError, match="does not fit zsad-tiny: missing"):
        clip_models.build_clip("zsad-tiny", checkpoint=str(tmp_path / "partial.pt"))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_arbitrary_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    with pytest.raises(clip_models.ModelLoadError, match="weights_only=True"):
        clip_models.build_clip("zsad-tiny", checkpoint=str(path))


def test_unknown_model_and_tag():
    with pytest.raises(clip_models.ModelLoadError, match="unknown open_clip model 'ViT-B-16-plsu'"):
        clip_models.build_clip("ViT-B-16-plsu")
    with pytest.raises(clip_models.ModelLoadError, match="no pretrained tag 'nope'.*laion400m_e31"):
        clip_models.build_clip("ViT-B-16-plus-240", tag="nope")


def test_preprocess_squashes_and_normalises():
    pre = clip_models.Preprocess(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    img = torch.full((4, 16, 3), 255, dtype=torch.uint8)  # non-square, white
    out = clip_models.preprocess_images([img, torch.zeros((8, 8, 3), dtype=torch.uint8)], pre)
    assert out.shape == (2, 3, 8, 8)
    assert torch.allclose(out[0, 0], torch.ones(8, 8)) and torch.allclose(out[0, 1], torch.full((8, 8), 2.0))
    assert torch.allclose(out[1, 0], -torch.ones(8, 8))


def test_truncated_text_encoding_equals_open_clip():

    model, _ = clip_models.build_clip("zsad-tiny")
    tok = clip_models.tokenizer("zsad-tiny")
    texts = [
        "a",
        "a photo of the flawless metal nut for anomaly detection",
        "a jpeg corrupted photo of a screw with defect.",
    ]
    assert clip_models._truncatable(model)
    with torch.no_grad():
        ours = clip_models.encode_text(model, tok, texts, torch.device("cpu"))
        ref = model.encode_text(tok(texts)).float()
        short = clip_models._encode_text_truncated(model, tok(texts[:1]))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(short, ref[:1], atol=1e-5)
