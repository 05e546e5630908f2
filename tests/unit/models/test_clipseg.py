"""CLIPSeg localiser: in-code configs, seeded init, strict weights loading, CLIP tokenisation and EOT
pooling, the split vision/decoder forward, harmonic-mean combination, batch invariance, sizes."""

import pickle
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from pipeline.models import clipseg as cs  # noqa: E402
from pipeline.models.prompts import LOCALISING_PROMPTS  # noqa: E402


def _tame(model):
    """Random init makes the tiny decoder's logits ~ +-60 (sigmoid saturates at 0/1 and every map
    collapses to eps); scale the last transposed convolution so the logits are O(1) and the maps
    carry information for the comparisons below."""
    with torch.no_grad():
        last = model.decoder.transposed_convolution[-1]
        last.weight.mul_(0.03)
        last.bias.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def model():
    return _tame(cs.build_clipseg(arch="tiny"))


@pytest.fixture(scope="module")
def prompts():
    return ["a tear", "a scratch", "a missing component"]


@pytest.fixture(scope="module")
def localiser(model, prompts):
    return cs.ClipSegLocaliser(model, prompts=prompts)


def _images(seed=0, shapes=((50, 70), (120, 40), (96, 96))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


# ---------------------------------------------------------------- building and loading


def test_tiny_builds_in_eval_mode_and_random_init_is_seeded():
    a = cs.build_clipseg(arch="tiny")
    assert not a.training and a.zsad_image_size == 96
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    b = cs.build_clipseg(arch="tiny")
    assert torch.equal(torch.rand(1), before)  # building leaves the global RNG alone
    c = cs.build_clipseg(arch="tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["clip.vision_model.embeddings.patch_embedding.weight"],
                           sc["clip.vision_model.embeddings.patch_embedding.weight"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_roundtrip_gives_identical_maps(tmp_path, model, prompts, suffix):
    path = tmp_path / f"w{suffix}"
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if suffix == ".pt":
        torch.save({"state_dict": sd}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    loaded = cs.build_clipseg(str(path), arch="tiny", seed=7)
    images = _images()
    want = cs.ClipSegLocaliser(model, prompts=prompts).maps(images)
    got = cs.ClipSegLocaliser(loaded, prompts=prompts).maps(images)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    other = cs.ClipSegLocaliser(_tame(cs.build_clipseg(arch="tiny", seed=7)), prompts=prompts).maps(images)
    assert max(float(np.abs(o - w).max()) for o, w in zip(other, want)) > 1e-2


def test_missing_or_unexpected_key_is_named(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["decoder.film_mul.weight"]
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(
        cs.ClipSegLoadError, match=r"partial\.pt does not fit CLIPSeg tiny: missing \['decoder\.film_mul\.weight'\]"
    ):
        cs.build_clipseg(str(path), arch="tiny")

    sd = dict(model.state_dict(), **{"decoder.extra.weight": torch.zeros(1)})
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(cs.ClipSegLoadError, match=r"unexpected \['decoder\.extra\.weight'\]"):
        cs.build_clipseg(str(tmp_path / "extra.pt"), arch="tiny")

    # legacy transformers exports saved position_ids buffers: dropped, not an error
    sd = dict(model.state_dict(), **{"clip.text_model.embeddings.position_ids": torch.arange(16)[None]})
    torch.save(sd, tmp_path / "legacy.pt")
    cs.build_clipseg(str(tmp_path / "legacy.pt"), arch="tiny")


def test_real_checkpoint_into_tiny_names_the_shape_mismatch(tmp_path, model):
    sd = dict(model.state_dict())
    sd["decoder.film_mul.weight"] = torch.zeros(64, 512)
    torch.save(sd, tmp_path / "big.pt")
    with pytest.raises(cs.ClipSegLoadError, match=r"shape mismatch \['decoder\.film_mul\.weight \(64, 512\)"):
        cs.build_clipseg(str(tmp_path / "big.pt"), arch="tiny")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_files_raise_load_error(tmp_path):
    with pytest.raises(cs.ClipSegLoadError, match="nope.pt does not exist"):
        cs.build_clipseg(str(tmp_path / "nope.pt"), arch="tiny")
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"x": _Evil()}, fh, protocol=2)
    with pytest.raises(cs.ClipSegLoadError, match="evil.pt could not be loaded safely"):
        cs.build_clipseg(str(evil), arch="tiny")
    with pytest.raises(cs.ClipSegLoadError, match="unknown CLIPSeg architecture 'rd16'"):
        cs.build_clipseg(arch="rd16")


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(cs.ClipSegLoadError, match=r"pip install 'zsad\[clipseg\]'"):
        cs.build_clipseg(arch="tiny")


def test_real_arch_matches_the_public_checkpoint_structure():
    cfg = cs.clipseg_config("rd64-refined")
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (
        768,
        12,
        12,
        16,
        224,
    )
    assert (t.hidden_size, t.num_hidden_layers, t.max_position_embeddings, t.vocab_size) == (512, 12, 77, 49408)
    assert (cfg.projection_dim, cfg.reduce_dim, list(cfg.extract_layers)) == (512, 64, [3, 6, 9])
    assert cfg.use_complex_transposed_convolution is True
    m = cs.build_clipseg(arch="rd64-refined", device="meta")  # structure only: fast, no weights
    n = sum(p.numel() for p in m.parameters())
    assert 148e6 < n < 153e6, n
    assert m.zsad_image_size == 352 and 352 % v.patch_size == 0


# ---------------------------------------------------------------- tokenisation and pooling


def test_tokenize_sot_eot_mask_and_truncation():
    ids, mask = cs.tokenize(["a tear", "a missing component", "word " * 40], context_length=16)
    assert ids.shape == mask.shape == (3, 16)
    assert (ids[:, 0] == cs.SOT_TOKEN).all()
    assert ids[0, :4].tolist() == [cs.SOT_TOKEN, 320, 11862, cs.EOT_TOKEN]  # CLIP BPE: "a", "tear"
    assert mask[0].tolist() == [1] * 4 + [0] * 12 and (ids[0, 4:] == 0).all()
    assert mask[1].sum() == 5
    assert ids[2, -1] == cs.EOT_TOKEN and mask[2].all()  # truncated, ends with EOT


def test_pooled_text_output_is_the_eot_state_and_ignores_what_follows(model):
    text = model.clip.text_model
    ids, mask = cs.tokenize(["a scratch", "an imperfection"], context_length=16)
    eot = (ids == cs.EOT_TOKEN).int().argmax(1)
    with torch.inference_mode():
        out = text(input_ids=ids, attention_mask=mask)
        assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), eot])
        # garbage after the EOT (with and without the mask covering it) changes nothing
        noisy = ids.clone()
        after = torch.arange(16)[None] > eot[:, None]
        noisy[after] = torch.randint(1, 49406, (int(after.sum()),), generator=torch.Generator().manual_seed(0))
        for m in (mask, torch.ones_like(mask)):
            torch.testing.assert_close(
                text(input_ids=noisy, attention_mask=m).pooler_output, out.pooler_output, atol=1e-6, rtol=0
            )
        # ... whereas a token before the EOT does (the check can fail)
        changed = ids.clone()
        changed[:, 1] = 1000
        assert (text(input_ids=changed, attention_mask=mask).pooler_output - out.pooler_output).abs().max() > 1e-3
        # legacy configs (eos_token_id == 2) pool argmax(ids): the same EOT position
        text.eos_token_id = 2
        try:
            torch.testing.assert_close(
                text(input_ids=noisy, attention_mask=mask).pooler_output, out.pooler_output, atol=1e-6, rtol=0
            )
        finally:
            text.eos_token_id = cs.EOT_TOKEN


# ---------------------------------------------------------------- maps


def test_default_prompts_are_vvv_localising_prompts(model):
    loc = cs.ClipSegLocaliser(model)
    assert loc.prompts == tuple(LOCALISING_PROMPTS) and len(loc.prompts) == 18
    assert loc.text_embeddings.shape == (18, model.config.projection_dim)
    assert loc.image_size == 96


def test_preprocess_squashes_and_normalises_with_imagenet_stats():
    img = np.zeros((30, 50, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 128, 0
    x = cs.preprocess([img], 352)
    assert x.shape == (1, 3, 352, 352)
    want = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(cs.IMAGENET_MEAN)) / torch.tensor(cs.IMAGENET_STD)
    torch.testing.assert_close(x[0].mean(dim=(1, 2)), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"image 0: expected an \(H, W, 3\) uint8"):
        cs.preprocess([img.astype(np.float32)], 352)


def test_split_forward_equals_the_transformers_forward(localiser, model):
    x = cs.preprocess(_images(), 96)
    p = len(localiser.prompts)
    got = localiser.prompt_logits(x)
    with torch.inference_mode():
        ref = model(
            pixel_values=x.repeat_interleave(p, 0), conditional_embeddings=localiser.text_embeddings.repeat(3, 1)
        ).logits
    assert got.shape == (3, p, 96, 96)
    torch.testing.assert_close(got.reshape(3 * p, 96, 96), ref, atol=1e-5, rtol=1e-5)
    # chunking the decoder over images changes nothing
    small = cs.ClipSegLocaliser(model, prompts=localiser.prompts, max_decoder_rows=1)
    torch.testing.assert_close(small.prompt_logits(x), got, atol=1e-5, rtol=1e-5)


def test_harmonic_mean_by_hand_on_2x2():
    maps = np.array([[[0.5, 1.0], [0.2, 0.0]], [[0.25, 1.0], [0.8, 0.5]]], np.float32)
    got = cs.harmonic_mean(maps, eps=1e-3)
    want = np.array([[2 / (2 + 4), 1.0], [2 / (5 + 1.25), 2 / (1000 + 2)]], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert isinstance(got, np.ndarray) and got.shape == (2, 2)
    t = cs.harmonic_mean(torch.from_numpy(maps).permute(1, 2, 0), eps=1e-3, dim=-1)
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-6)
    with pytest.raises(ValueError, match="eps must be > 0"):
        cs.harmonic_mean(maps, eps=0.0)


def test_combination_is_the_harmonic_mean_of_per_prompt_sigmoid_maps(localiser):
    x = cs.preprocess(_images(), 96)
    probs = torch.sigmoid(localiser.prompt_logits(x)).double().numpy()  # (B, P, S, S)
    assert 0.05 < probs.mean() < 0.95  # informative maps, not saturated
    want = probs.shape[1] / (1.0 / np.maximum(probs, cs.HARMONIC_EPS)).sum(axis=1)
    got = localiser.maps_torch(x).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, probs.mean(axis=1), atol=1e-3)  # not the arithmetic mean


def test_maps_sizes_range_and_batch_invariance(localiser):
    images = _images(1)
    batch = localiser.maps(images)
    assert [m.shape for m in batch] == [im.shape[:2] for im in images]
    assert all(m.dtype == np.float32 and m.min() >= 0.0 and m.max() <= 1.0 for m in batch)
    assert all(float(m.std()) > 1e-3 for m in batch)
    for im, m in zip(images, batch):
        np.testing.assert_allclose(localiser.maps([im])[0], m, atol=1e-5, rtol=0)
    np.testing.assert_allclose(localiser.maps(images[::-1])[0], batch[-1], atol=1e-5, rtol=0)
    assert localiser.maps([]) == []


def test_localiser_rejects_bad_settings(model):
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        cs.ClipSegLocaliser(model, prompts=["a dent"], image_size=100)
    with pytest.raises(ValueError, match="non-empty list"):
        cs.ClipSegLocaliser(model, prompts=[])
